// cxrcae serve page: drop or pick a file, POST it to predict?explain=1&preview=1, draw the answer.
// Everything here is served by the package itself; nothing is loaded from elsewhere. Server text is put in
// the page with textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
// keys drawn in their own place; any other scalar key of the answer is listed under the details
const KNOWN = new Set([
  "status", "reason", "label", "probability", "top_class", "probabilities", "top_k", "model", "input",
  "seconds", "preview_png", "overlay_png", "out_of_distribution", "ood_score", "ood_reason",
]);
let maxBytes = null;
let busy = false;

function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.className = "status" + (kind ? " " + kind : "");
}

function percent(p) {
  return (100 * p).toFixed(1) + "%";
}

function sizeText(n) {
  const fixed = (x) => (Number.isInteger(x) ? String(x) : x.toFixed(1));
  if (n >= 1 << 20) return fixed(n / (1 << 20)) + " MiB";
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(0) + " KiB";
  return n + " bytes";
}

async function loadModel() {
  try {
    const [model, health] = await Promise.all([fetch("model"), fetch("health")]);
    if (model.ok) {
      const m = await model.json();
      $("model-name").textContent =
        `model ${m.id} (${m.version}) · ${m.class_names.join(" / ")} · ${m.image_size} px · ${m.device}`;
    } else {
      $("model-name").textContent = `model information unavailable (HTTP ${model.status})`;
    }
    if (health.ok) {
      maxBytes = (await health.json()).max_upload_bytes;
      $("limit").textContent = `, up to ${sizeText(maxBytes)}`;
    }
  } catch (err) {
    $("model-name").textContent = "the server does not answer";
  }
}

async function send(file) {
  if (!file || busy) return;
  if (maxBytes !== null && file.size > maxBytes) {
    setStatus(`${file.name} is ${sizeText(file.size)}; the limit is ${sizeText(maxBytes)}.`, "error");
    return;
  }
  busy = true;
  setStatus(`Analysing ${file.name}…`, "busy");
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await fetch("predict?explain=1&preview=1", { method: "POST", body: form });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      let message = data.detail ? String(data.detail) : `the server answered HTTP ${response.status}`;
      const retry = response.headers.get("Retry-After");
      if (response.status === 503 && retry) message += ` (retry in ${retry} s)`;
      setStatus(`${file.name}: ${message}`, "error");
      return;
    }
    render(data, file);
    setStatus(`${file.name}: answered in ${data.seconds.toFixed(2)} s.`);
  } catch (err) {
    setStatus(`${file.name}: the server did not answer (${err.message}).`, "error");
  } finally {
    busy = false;
  }
}

function render(data, file) {
  $("result").hidden = false;
  $("preview").src = "data:image/png;base64," + data.preview_png;
  const overlay = $("overlay");
  if (data.overlay_png) {
    overlay.src = "data:image/png;base64," + data.overlay_png;
    overlay.hidden = false;
  } else {
    overlay.removeAttribute("src");
    overlay.hidden = true;
  }
  applyOpacity();

  const refused = data.status === "refused";
  $("label").textContent = refused ? "refused" : data.label;
  $("label-probability").textContent = refused ? "" : percent(data.probability);
  const uncertain = $("uncertain");
  uncertain.hidden = refused || data.label === data.top_class;
  uncertain.textContent = `Most likely class: ${data.top_class}.`;
  const ood = $("ood");
  ood.hidden = data.out_of_distribution !== true;
  ood.textContent = refused
    ? `Not analysed: ${data.reason || data.ood_reason}.`
    : "This image looks unlike the images the model was trained on (out of distribution): do not rely " +
      "on the prediction" + (data.ood_reason ? ` (${data.ood_reason}).` : ".");

  const bars = $("bars");
  bars.replaceChildren();
  for (const [name, p] of Object.entries(data.probabilities)) {
    const li = document.createElement("li");
    li.dataset.class = name;
    if (name === data.top_class) li.className = "top";
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = percent(p);
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = percent(p);
    li.append(label, track, value);
    bars.append(li);
  }

  const rows = [
    ["File", `${file.name} (${sizeText(data.input.bytes)})`],
    ["Format", data.input.format],
  ];
  const dicom = data.input.dicom;
  if (dicom) {
    rows.push(["Intensity", dicom.intensity]);
    if (dicom.window) {
      let text = `centre ${dicom.window.center}, width ${dicom.window.width}`;
      if (dicom.window.function && dicom.window.function !== "LINEAR") text += ` (${dicom.window.function})`;
      if (dicom.window.explanation) text += ` · ${dicom.window.explanation}`;
      if (dicom.windows_in_file > 1) text += ` · first of ${dicom.windows_in_file} in the file`;
      rows.push(["Window", text]);
    }
    rows.push(["Photometric", dicom.photometric_interpretation]);
    if (dicom.bits_stored) rows.push(["Bits stored", String(dicom.bits_stored)]);
  }
  if (typeof data.out_of_distribution === "boolean") {
    let text = data.out_of_distribution ? "yes" : "no";
    if (typeof data.ood_score === "number") text += ` (score ${data.ood_score.toFixed(2)}; above 1 is flagged)`;
    rows.push(["Out of distribution", text]);
  }
  for (const [key, value] of Object.entries(data)) {
    if (KNOWN.has(key) || value === null || value === "" || typeof value === "object") continue;
    rows.push([key.replace(/_/g, " "), String(value)]);
  }
  rows.push(["Model", `${data.model.id} (${data.model.version})`]);
  const details = $("details");
  details.replaceChildren();
  for (const [term, description] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = description;
    details.append(dt, dd);
  }
}

function applyOpacity() {
  const value = Number($("opacity").value);
  $("overlay").style.opacity = String(value / 100);
  $("opacity-value").textContent = value + "%";
}

function setUp() {
  const drop = $("drop");
  const input = $("file");
  $("pick").addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });
  input.addEventListener("change", () => {
    send(input.files[0]);
    input.value = "";
  });
  // a file dropped anywhere is analysed, never opened by the browser in place of the page
  for (const name of ["dragenter", "dragover"]) {
    document.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) drop.classList.remove("over");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) send(file);
  });
  $("opacity").addEventListener("input", applyOpacity);
  loadModel();
}

setUp();
