"""Classify X-ray files with a fine-tuned checkpoint: one row per input file, in input order, streamed.

``iter_predictions`` is the engine: inputs (files, folders, globs) are expanded in the order given, images
are decoded in DataLoader workers through ``cxrcae.io.load_for_model`` with the preprocessing stored in the
checkpoint's config.json, and rows are yielded as soon as their batch is done, so memory stays flat. A file
that cannot be read becomes an ``error`` row with its reason; a non-image file met while scanning a folder
becomes a ``skipped`` row. ``predict`` is the notebook form returning a list.

Probabilities are ``softmax(logits / T)`` with the checkpoint's calibrated temperature T (1 if none).

``backend="onnxruntime"`` runs the same batches through the checkpoint's exported ``model.onnx``
(``cxrcae.infer.onnx``; exported on the fly into a temporary file when the folder has none) on the CPU:
rows are the same, Grad-CAM is not available there.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrcae import bundled
from cxrcae.errors import CxrcaeError
from cxrcae.eval.calibration import model_temperature
from cxrcae.eval.explain import GradCAM, save_overlay
from cxrcae.hub.resolve import resolve_checkpoint
from cxrcae.infer.batches import UniqueNames, iter_batches, load_for_inference
from cxrcae.infer.onnx import onnx_classifier, require_onnxruntime
from cxrcae.io import find_images
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import autocast, resolve_device, resolve_precision

UNCERTAIN = "uncertain"
BACKENDS = ("torch", "onnxruntime")
_NOT_FOUND = ("no such file or directory", "no match")


@dataclass
class Prediction:
    """One input file. ``label`` is the predicted class, or "uncertain" below ``threshold``; ``top_class``
    is always the arg-max class. ``status`` is "ok", "error" (unreadable; see ``reason``) or "skipped"."""

    path: str
    status: str = "ok"
    label: str | None = None
    probability: float | None = None
    top_class: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    top_k: list[tuple[str, float]] = field(default_factory=list)
    reason: str = ""
    explanation: str | None = None

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
    num_workers: int = 0,
    device: str = "auto",
    precision: str = "auto",
    top_k: int | None = None,
    threshold: float | None = None,
    explain_dir: str | Path | None = None,
    recursive: bool = True,
    backend: str = "torch",
    progress: ProgressFn = no_progress,
) -> Iterator[Prediction]:
    """Yield one ``Prediction`` per input file, in input order (see the module docstring)."""

    runner = None
    if _check_backend(backend, device, precision, explain_dir) == "onnxruntime":
        runner, config = onnx_classifier(resolve_model_ref(model), progress=progress)
        net, dev, dtype = None, torch.device("cpu"), None
    else:
        dev = resolve_device(device)
        net, config = load_for_inference(resolve_model_ref(model), dev, kind="classifier")
        dtype = resolve_precision(precision, dev)
    names = list(config["class_names"])
    temperature = model_temperature(config)
    k = len(names) if top_k is None else max(1, min(int(top_k), len(names)))
    entries = collect_inputs(inputs, recursive)
    to_decode = [i for i, (_, status, _) in enumerate(entries) if status == "ok"]
    explainer, namer = _explainer(net, explain_dir)

    total, done, start = len(entries), 0, time.perf_counter()
    emitted = 0
    results: dict[int, Prediction] = {}

    def flush(upto: int) -> Iterator[Prediction]:
        nonlocal emitted
        while emitted < upto:
            path, status, reason = entries[emitted]
            yield results.pop(emitted) if emitted in results else Prediction(path, status, reason=reason)
            emitted += 1

    paths = [entries[i][0] for i in to_decode]
    size, mode = int(config["image_size"]), config.get("resize_mode", "stretch")
    for batch in iter_batches(paths, size, mode, batch_size=batch_size, num_workers=num_workers):
        for j, path, reason in batch.errors:
            results[to_decode[j]] = Prediction(path, "error", reason=reason)
        if batch.indices:
            images = batch.images.to(dev, non_blocking=True)
            if explainer is not None:
                logits, cams = explainer(images)
            elif runner is not None:
                logits = torch.from_numpy(runner(batch.images.numpy()))
            else:
                with torch.inference_mode(), autocast(dev, dtype):
                    logits = net(images)
            probs = torch.softmax(logits.float() / temperature, dim=1).cpu().numpy()
            for row, (j, path) in enumerate(zip(batch.indices, batch.paths)):
                pred = _make_prediction(path, probs[row], names, k, threshold)
                if explainer is not None:
                    pred.explanation = _explain_one(namer, path, batch.images[row], cams[row])
                results[to_decode[j]] = pred
        last = max([*batch.indices, *(j for j, _, _ in batch.errors)])
        done = to_decode[last] + 1
        # rows between decoded files (skipped/missing ones) are ready as soon as the batch before them is
        upto = to_decode[last + 1] if last + 1 < len(to_decode) else total
        rate = (last + 1) / max(time.perf_counter() - start, 1e-9)
        progress("predict", done, total, f"{rate:.1f} img/s")
        yield from flush(upto)
    yield from flush(total)
    rate = len(to_decode) / max(time.perf_counter() - start, 1e-9)
    progress("predict", total, total, f"{rate:.1f} img/s" if to_decode else "")


def _check_backend(backend: str, device: str, precision: str, explain_dir: Any) -> str:
    """The backend's name, after refusing what it cannot do (before any model is loaded)."""
    name = str(backend or "torch").strip().lower()
    if name not in BACKENDS:
        raise CxrcaeError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if name == "onnxruntime":
        if explain_dir is not None:
            raise CxrcaeError(
                "Grad-CAM (--explain) needs gradients, which only the torch backend has; "
                "drop --explain or use --backend torch"
            )
        if str(device or "auto").strip().lower() not in ("auto", "cpu"):
            raise CxrcaeError(f"the onnxruntime backend runs on the CPU; drop --device {device} or use torch")
        if str(precision or "auto").strip().lower() not in ("auto", "fp32"):
            raise CxrcaeError(
                f"the onnxruntime backend runs in fp32; drop --precision {precision} or use torch"
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
