"""Classify X-ray files with a fine-tuned checkpoint: one row per input file, in input order, streamed.

``iter_predictions`` is the engine: inputs (files, folders, globs) are expanded in the order given, images
are decoded in DataLoader workers through ``cxrcae.io.load_for_model`` with the preprocessing stored in the
checkpoint's config.json, and rows are yielded as soon as their batch is done, so memory stays flat. A file
that cannot be read becomes an ``error`` row with its reason; a non-image file met while scanning a folder
becomes a ``skipped`` row. ``predict`` is the notebook form returning a list.

Probabilities are ``softmax(logits / T)`` with the checkpoint's calibrated temperature T (1 if none).

Every decoded input is screened (``cxrcae.ood.screen``; ``ood=False`` turns it off): a DICOM header that
is not a chest radiograph gives a "refused" row without a class; a lateral view, a coloured or blank image,
or a reconstruction error above the model's OOD guard threshold sets ``out_of_distribution`` and the label
"uncertain" (``top_class`` and the probabilities stay).

``backend="onnxruntime"`` runs the same batches through the checkpoint's exported ``model.onnx``
(``cxrcae.infer.onnx``; exported on the fly into a temporary file when the folder has none) on the CPU:
rows are the same, Grad-CAM is not available there. ``backend="onnxruntime-int8"`` runs the int8 graph of
``cxrcae export --onnx --int8`` (``cxrcae.infer.quantize``), refused unless its recorded agreement with fp32
meets the bar (``force_int8`` overrides). The torch backend runs the model in channels_last (NHWC): forward
passes measured about 1.5x faster than NCHW on CPUs (Intel AVX-512; on AMD Zen 3 the frozen-encoder stage,
a forward pass, was too), the same results up to fp32 rounding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrcae import bundled
from cxrcae.errors import CxrcaeError
from cxrcae.hub.resolve import resolve_checkpoint
from cxrcae.infer.batches import UniqueNames, load_for_inference
from cxrcae.infer.explain import GradCAM, save_overlay
from cxrcae.infer.onnx import onnx_classifier, require_onnxruntime
from cxrcae.infer.quantize import int8_classifier
from cxrcae.infer.workers import WorkerPlan, threads_beside
from cxrcae.io import find_images
from cxrcae.models.checkpoint import model_temperature
from cxrcae.ood.screen import UNCERTAIN, Screen
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import autocast, resolve_device, resolve_precision

BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")
_NOT_FOUND = ("no such file or directory", "no match")


@dataclass
class Prediction:
    """One input file. ``label`` is the predicted class, or "uncertain" below ``threshold`` or when the
    input is out of distribution; ``top_class`` is always the arg-max class. ``status`` is "ok", "error"
    (unreadable; see ``reason``), "skipped" or "refused" (not a chest radiograph by its DICOM header; no
    class). ``out_of_distribution`` is None when the screen did not run, ``ood_score`` the larger of the
    guard's two reconstruction scores over their thresholds (> 1 flagged; None without a guard),
    ``ood_reason`` why it was flagged or refused."""

    path: str
    status: str = "ok"
    label: str | None = None
    probability: float | None = None
    top_class: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    top_k: list[tuple[str, float]] = field(default_factory=list)
    reason: str = ""
    explanation: str | None = None
    out_of_distribution: bool | None = None
    ood_score: float | None = None
    ood_reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["top_k"] = [list(t) for t in self.top_k]
        return row


def resolve_model_ref(model: Any) -> Any:
    """``model`` as given, or the bundled default classifier; a clear error when there is neither."""
    if model is not None and model != "":
        return model
    return bundled.require(
        bundled.bundled_classifier(),
        "model",
        "pass --model MODEL_DIR (a fine-tuned checkpoint folder) or --model user/repo (a Hub id)",
    )


def model_folder(model: Any) -> Any:
    """The checkpoint folder ``model`` names (Hub ids downloaded, the bundled default filled in), resolved
    once so that a caller can read its config and hand the same folder to ``iter_predictions``; an
    in-memory model is returned as is."""
    ref = resolve_model_ref(model)
    return ref if isinstance(ref, nn.Module) else resolve_checkpoint(ref)


def collect_inputs(inputs: Iterable[str | Path], recursive: bool = True) -> list[tuple[str, str, str]]:
    """``(path, status, reason)`` per file in the order given: status "ok" (to decode), "error", "skipped".

    Files named explicitly are always decoded; a missing path or an empty glob is an error row; non-image
    files found while scanning a folder are skipped rows; hidden files are left out. Duplicates are dropped.
    """

    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    entries: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for item in inputs:
        files, skipped = find_images([item], recursive=recursive)
        found = [(str(p), "ok", "") for p in files]
        for p, reason in skipped:
            if reason.startswith("hidden"):
                continue
            found.append((str(p), "error" if reason in _NOT_FOUND else "skipped", reason))
        for entry in sorted(found, key=lambda e: e[0]):
            if entry[0] not in seen:
                seen.add(entry[0])
                entries.append(entry)
    return entries


def iter_predictions(
    inputs: Iterable[str | Path] | str | Path,
    model: Any = None,
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    top_k: int | None = None,
    threshold: float | None = None,
    explain_dir: str | Path | None = None,
    recursive: bool = True,
    backend: str = "torch",
    ood: bool = True,
    progress: ProgressFn = no_progress,
    force_int8: bool = False,
    reuse: Callable[[str], dict[str, Any] | None] | None = None,
) -> Iterator[Prediction]:
    """Yield one ``Prediction`` per input file, in input order (see the module docstring).

    ``reuse(path)``: the row (``Prediction.to_dict``) an interrupted run already computed for that file,
    or None; such files are not decoded again (``predict --resume``, ``cxrcae.infer.writers.RowJournal``).
    """

    runner = None
    backend = _check_backend(backend, device, precision, explain_dir)
    if backend != "torch":

        def make_runner(workers: int):
            """The ONNX Runtime session, its threads cut to the cores ``workers`` leave."""
            threads = max(1, torch.get_num_threads() - workers) if workers else None
            if backend == "onnxruntime-int8":
                return int8_classifier(resolve_model_ref(model), force=force_int8, threads=threads)
            return onnx_classifier(resolve_model_ref(model), progress=progress, threads=threads)

        runner, config = make_runner(num_workers or 0)
        net, dev, dtype = None, torch.device("cpu"), None
    else:
        dev = resolve_device(device)
        net, config = load_for_inference(resolve_model_ref(model), dev, kind="classifier")
        net = net.to(memory_format=torch.channels_last)  # see the module docstring
        dtype = resolve_precision(precision, dev)
    screen = Screen.for_model(resolve_model_ref(model), config, dev) if ood else None
    names = list(config["class_names"])
    temperature = model_temperature(config)
    k = len(names) if top_k is None else max(1, min(int(top_k), len(names)))
    entries = collect_inputs(inputs, recursive)
    saved = {i for i, (p, status, _) in enumerate(entries) if status == "ok" and reuse and reuse(p)}
    to_decode = [i for i, (_, status, _) in enumerate(entries) if status == "ok" and i not in saved]
    explainer, namer = _explainer(net, explain_dir)
    for i in saved if namer is not None else ():  # overlays already written keep their names
        if (explanation := reuse(entries[i][0]).get("explanation")) is not None:
            namer.used.add(Path(explanation).name)

    total, done, start = len(entries), 0, time.perf_counter()
    emitted = 0
    results: dict[int, Prediction] = {}

    def flush(upto: int) -> Iterator[Prediction]:
        nonlocal emitted
        while emitted < upto:
            path, status, reason = entries[emitted]
            if emitted in saved:
                yield _from_row(reuse(path))
            else:
                yield results.pop(emitted) if emitted in results else Prediction(path, status, reason=reason)
            emitted += 1

    paths = [entries[i][0] for i in to_decode]
    size, mode = int(config["image_size"]), config.get("resize_mode", "stretch")
    plan = WorkerPlan(num_workers)  # None: chosen by timing the first batch (cxrcae.infer.workers)
    runner_workers = plan.workers
    for batch in plan.batches(paths, size, mode, batch_size, facts=screen is not None):
        if runner is not None and plan.workers != runner_workers:  # workers chosen after the first batch
            runner, runner_workers = make_runner(plan.workers)[0], plan.workers
        for j, path, reason in batch.errors:
            results[to_decode[j]] = Prediction(path, "error", reason=reason)
        if batch.indices:
            with plan.computing():
                images = batch.images.to(dev, non_blocking=True)
                if explainer is not None:
                    logits, cams = explainer(images)
                elif runner is not None:
                    logits = torch.from_numpy(runner(batch.images.numpy()))
                else:
                    with torch.inference_mode(), autocast(dev, dtype), threads_beside(dev, plan.workers):
                        logits = net(images)
                probs = torch.softmax(logits.float() / temperature, dim=1).cpu().numpy()
                verdicts = screen.check(batch.images, batch.facts) if screen is not None else None
            for row, (j, path) in enumerate(zip(batch.indices, batch.paths)):
                pred = _make_prediction(path, probs[row], names, k, threshold)
                if verdicts is not None:
                    verdicts[row].apply(pred)
                if explainer is not None:
                    pred.explanation = _explain_one(namer, path, batch.images[row], cams[row])
                results[to_decode[j]] = pred
        last = max([*batch.indices, *(j for j, _, _ in batch.errors)])
        done = to_decode[last] + 1
        # rows between decoded files (skipped/missing ones) are ready as soon as the batch before them is
        upto = to_decode[last + 1] if last + 1 < len(to_decode) else total
        rate = (last + 1) / max(time.perf_counter() - start, 1e-9)
        progress("predict", done, total, f"{rate:.1f} img/s, {plan.workers} decoding workers")
        yield from flush(upto)
    yield from flush(total)
    rate = len(to_decode) / max(time.perf_counter() - start, 1e-9)
    progress("predict", total, total, f"{rate:.1f} img/s" if to_decode else "")


def _from_row(row: dict[str, Any]) -> Prediction:
    """A ``Prediction`` from its ``to_dict`` form (as read back from JSON)."""
    known = {k: v for k, v in row.items() if k in Prediction.__dataclass_fields__}
    known["top_k"] = [tuple(t) for t in known.get("top_k") or []]
    return Prediction(**known)


def _check_backend(backend: str, device: str, precision: str, explain_dir: Any) -> str:
    """The backend's name, after refusing what it cannot do (before any model is loaded)."""
    name = str(backend or "torch").strip().lower()
    if name not in BACKENDS:
        raise CxrcaeError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if name != "torch":
        if explain_dir is not None:
            raise CxrcaeError(
                "Grad-CAM (--explain) needs gradients, which only the torch backend has; "
                "drop --explain or use --backend torch"
            )
        if str(device or "auto").strip().lower() not in ("auto", "cpu"):
            raise CxrcaeError(f"the {name} backend runs on the CPU; drop --device {device} or use torch")
        if str(precision or "auto").strip().lower() not in ("auto", "fp32"):
            raise CxrcaeError(
                f"the {name} backend sets its own precision; drop --precision {precision} or use torch"
            )
        require_onnxruntime()
    return name


def _make_prediction(path: str, probs, names: Sequence[str], k: int, threshold: float | None) -> Prediction:
    order = probs.argsort()[::-1]
    best = int(order[0])
    p_best = float(probs[best])
    label = names[best] if threshold is None or p_best >= threshold else UNCERTAIN
    return Prediction(
        path=path,
        status="ok",
        label=label,
        probability=p_best,
        top_class=names[best],
        probabilities={n: float(probs[i]) for i, n in enumerate(names)},
        top_k=[(names[int(i)], float(probs[int(i)])) for i in order[:k]],
    )


def _explainer(net, explain_dir):
    if explain_dir is None:
        return None, None

    out = Path(explain_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    return GradCAM(net), UniqueNames(out, ".gradcam.png")


def _explain_one(namer: UniqueNames, path: str, image, cam) -> str:

    target = namer(path)
    save_overlay(target, image[0].cpu().numpy(), cam.cpu().numpy())
    return str(target)


def predict(paths: Iterable[str | Path] | str | Path, model: Any = None, **kwargs: Any) -> list[Prediction]:
    """Classify files, folders or globs: one ``Prediction`` per file in input order (``iter_predictions``).

    >>> rows = cxrcae.predict(["scan1.png", "folder/"], model="runs/finetune")  # doctest: +SKIP
    >>> rows[0].label, rows[0].probabilities                                    # doctest: +SKIP
    """
    return list(iter_predictions(paths, model, **kwargs))
