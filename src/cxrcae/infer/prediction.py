"""Run a fine-tuned checkpoint over X-ray files: one row per input file, in input order, streamed.

``iter_predictions`` is the engine, the same for every task: the model is resolved once into a
``LoadedModel`` (``cxrcae.hub.resolve``), inputs (files, folders, globs) are expanded in the order given,
images are decoded in DataLoader workers through ``cxrcae.io.load_for_model`` with the preprocessing stored
in the checkpoint's config.json, and rows are yielded as soon as their batch is done, so memory stays flat.
What a row says about an image is its task's (``Task.prediction_row``: a classifier's label, probabilities
and top classes). A file that cannot be read becomes an ``error`` row with its reason; a non-image file met
while scanning a folder becomes a ``skipped`` row. ``predict`` is the notebook form returning a list;
``cxrcae.infer.predict_run.run_predict`` writes the rows to a file.

Every decoded input is screened (``cxrcae.ood.screen``; ``ood=False`` turns it off): a DICOM header that
is not a chest radiograph gives a "refused" row without an answer; a lateral view, a coloured or blank image,
or a reconstruction error above the model's OOD guard threshold sets ``out_of_distribution`` (a classifier's
label becomes "uncertain"; ``top_class`` and the probabilities stay).

Switches only some tasks have are refused in one line for the others (``Task.require_option``): ``top_k``
and ``threshold``, Grad-CAM overlays (``explain_dir``: the arg-max class's heat map) and the ONNX backends.
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cxrcae import bundled
from cxrcae.errors import CxrcaeError
from cxrcae.hub.resolve import LoadedModel
from cxrcae.infer.batches import UniqueNames, answering_model
from cxrcae.infer.explain import GradCAM, save_overlay
from cxrcae.infer.onnx import onnx_classifier, require_onnxruntime
from cxrcae.infer.quantize import int8_classifier
from cxrcae.infer.workers import WorkerPlan, threads_beside
from cxrcae.io import find_images
from cxrcae.ood.screen import REFUSED, UNCERTAIN, Screen, Verdict
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import autocast, resolve_device, resolve_precision
from cxrcae.tasks import Task

BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")
_NOT_FOUND = ("no such file or directory", "no match")
GENERIC = ("path", "status", "reason", "out_of_distribution", "ood_score", "ood_reason")
"""The fields every row has, whatever its task: the rest of a row is the task's."""
EXPLANATION = "explanation"
"""The row field naming a Grad-CAM overlay (``explain_dir``), for tasks that have ``explain``."""
__all__ = ["UNCERTAIN", "Prediction", "collect_inputs", "iter_predictions", "predict", "resolve_model_ref"]


@dataclass
class Prediction:
    """One input file. ``status`` is "ok", "error" (unreadable; see ``reason``), "skipped" or "refused"
    (not a chest radiograph by its DICOM header; no answer). ``values`` is the task's answer
    (``Task.prediction_row``; a classifier's ``label``, ``probability``, ``top_class``, ``probabilities`` and
    ``top_k``), the task's empty answer for a row without one; values read as attributes too
    (``row.label``). ``files`` names files a predict feature wrote for the image (a classifier's Grad-CAM
    overlay: ``explanation``).
    ``out_of_distribution`` is None when the screen did not run, ``ood_score`` the larger of the guard's two
    reconstruction scores over their thresholds (> 1 flagged; None without a guard), ``ood_reason`` why it
    was flagged or refused."""

    path: str
    status: str = "ok"
    values: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    files: dict[str, str | None] = field(default_factory=dict)
    out_of_distribution: bool | None = None
    ood_score: float | None = None
    ood_reason: str = ""

    def __getattr__(self, name: str) -> Any:
        """A value or file of the row by name (``row.label``); only reached when no field has that name."""
        if not name.startswith("__"):
            for part in ("values", "files"):
                found = self.__dict__.get(part) or {}
                if name in found:
                    return found[name]
        raise AttributeError(f"{type(self).__name__} has no field, value or file {name!r}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        """The row as files and JSON hold it: path, status, the task's values, reason, files, the screen's."""
        return {
            "path": self.path,
            "status": self.status,
            **_plain(self.values),
            "reason": self.reason,
            **self.files,
            "out_of_distribution": self.out_of_distribution,
            "ood_score": self.ood_score,
            "ood_reason": self.ood_reason,
        }


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: a row reads back from JSON as it was."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class RowShape:
    """What every row of one model's predictions holds: its task's empty answer, the file fields its
    features add, and the options the task's ``prediction_row`` takes (``top_k``, ``threshold``)."""

    task: Task
    config: dict[str, Any]
    options: dict[str, Any]
    blank: dict[str, Any]
    file_fields: tuple[str, ...]

    @classmethod
    def of(cls, loaded: LoadedModel, **options: Any) -> RowShape:
        task, config = loaded.task, loaded.config
        files = (EXPLANATION,) if "explain" in task.options else ()
        return cls(task, config, options, task.prediction_blank(config), files)

    def empty(self, path: str, status: str, reason: str = "") -> Prediction:
        """The row of an input without an answer (unreadable, skipped)."""
        return Prediction(path, status, dict(self.blank), reason, dict.fromkeys(self.file_fields))

    def answer(self, path: str, probabilities: Any) -> Prediction:
        values = self.task.prediction_row(probabilities, self.config, **self.options)
        return Prediction(path, "ok", values, "", dict.fromkeys(self.file_fields))

    def screened(self, pred: Prediction, verdict: Verdict) -> Prediction:
        """The screen's verdict written into ``pred``: refused (no answer) or flagged (``flag_uncertain``)."""
        pred.out_of_distribution = verdict.out_of_distribution
        pred.ood_score = verdict.score
        pred.ood_reason = verdict.reason
        if verdict.refused:
            pred.status, pred.reason, pred.values = REFUSED, verdict.reason, dict(self.blank)
        elif verdict.flagged:
            pred.values = self.task.flag_uncertain(pred.values, self.config)
        return pred

    def from_row(self, row: dict[str, Any]) -> Prediction:
        """A ``Prediction`` from its ``to_dict`` form (as read back from JSON, for ``--resume``)."""
        fields = {k: row[k] for k in GENERIC if k in row}
        files = {k: row.get(k) for k in self.file_fields}
        values = {k: v for k, v in row.items() if k not in GENERIC and k not in self.file_fields}
        return Prediction(values=values, files=files, **fields)


def resolve_model_ref(model: Any) -> Any:
    """``model`` as given, or the bundled default classifier; a clear error when there is neither."""
    if model is not None and model != "":
        return model
    return bundled.require(
        bundled.bundled_classifier(),
        "model",
        "pass --model MODEL_DIR (a fine-tuned checkpoint folder) or --model user/repo (a Hub id)",
    )


def prediction_model(
    model: Any, device: str = "auto", backend: str = "torch", *, ood: bool = True
) -> LoadedModel:
    """The model predict runs, resolved once: ``model`` (folder, Hub id, ``load_model`` object,
    ``LoadedModel``; the bundled default when None) with its weights on ``device`` for the torch backend, its
    config alone for the onnxruntime ones (they run their own file), with its OOD screen when ``ood``."""
    ref = resolve_model_ref(model)
    if backend == "torch":
        loaded = answering_model(ref, resolve_device(device))
    else:
        loaded = answering_model(ref, "cpu", weights=False)
        loaded.task.require_option("onnx", f"--backend {backend}")
    if ood and loaded.guard is None:
        where = loaded.folder if loaded.folder is not None else loaded.net
        loaded.guard = Screen.for_model(where, loaded.config, _device_of(loaded))
    return loaded


def _device_of(loaded: LoadedModel) -> torch.device:
    if loaded.net is None:
        return torch.device("cpu")
    return next(loaded.net.parameters(), torch.empty(0)).device


def task_options(task: Task, *, top_k: int | None = None, threshold: float | None = None) -> dict[str, Any]:
    """The values the user set for the task's ``prediction_row`` (``--top-k``, ``--threshold``), each
    refused in one line for a task without it."""
    options: dict[str, Any] = {}
    if top_k is not None:
        task.require_option("top_k", "--top-k")
        options["top_k"] = int(top_k)
    if threshold is not None:
        task.require_option("threshold", "--threshold")
        options["threshold"] = float(threshold)
    return options


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
    files_dir: str | Path | None = None,
    recursive: bool = True,
    backend: str = "torch",
    ood: bool = True,
    progress: ProgressFn = no_progress,
    force_int8: bool = False,
    reuse: Callable[[str], dict[str, Any] | None] | None = None,
) -> Iterator[Prediction]:
    """Yield one ``Prediction`` per input file, in input order (see the module docstring).

    ``model``: a checkpoint folder, Hub id, ``load_model`` object or ``LoadedModel`` (used as is, with its
    network and screen); None is the bundled default. ``files_dir``: where the files a task writes per image
    go (``Task.prediction_files``: masks, overlays; a classifier writes none). ``reuse(path)``: the row
    (``Prediction.to_dict``) an interrupted run already computed for that file, or None; such files are not
    decoded again (``predict --resume``, ``cxrcae.infer.writers.RowJournal``).
    """

    backend = check_backend(backend, device, precision, explain_dir)
    loaded = prediction_model(model, device, backend, ood=ood)
    shape = RowShape.of(loaded, **task_options(loaded.task, top_k=top_k, threshold=threshold))
    if explain_dir is not None:
        loaded.task.require_option("explain", "--explain")
    runner = None
    if backend != "torch":

        def make_runner(workers: int):
            """The ONNX Runtime session, its threads cut to the cores ``workers`` leave."""
            threads = max(1, torch.get_num_threads() - workers) if workers else None
            if backend == "onnxruntime-int8":
                return int8_classifier(loaded, force=force_int8, threads=threads)
            return onnx_classifier(loaded, progress=progress, threads=threads)

        runner = make_runner(num_workers or 0)
        net, dev, dtype = None, torch.device("cpu"), None
    else:
        dev = _device_of(loaded)
        net = loaded.net.to(memory_format=torch.channels_last)  # see the module docstring
        dtype = resolve_precision(precision, dev)
    screen = loaded.guard if ood else None
    entries = collect_inputs(inputs, recursive)
    saved = {i for i, (p, status, _) in enumerate(entries) if status == "ok" and reuse and reuse(p)}
    to_decode = [i for i, (_, status, _) in enumerate(entries) if status == "ok" and i not in saved]
    explainer, namer = _explainer(net, explain_dir)
    files_namer = _files_namer(files_dir)
    for i in saved:  # files already written keep their names
        row = reuse(entries[i][0])
        if namer is not None and row.get(EXPLANATION) is not None:
            namer.used.add(Path(row[EXPLANATION]).name)
        if files_namer is not None:
            files_namer.used.update(_written_stems(row, files_namer.folder))

    total, done, start = len(entries), 0, time.perf_counter()
    emitted = 0
    results: dict[int, Prediction] = {}

    def flush(upto: int) -> Iterator[Prediction]:
        nonlocal emitted
        while emitted < upto:
            path, status, reason = entries[emitted]
            if emitted in saved:
                yield shape.from_row(reuse(path))
            else:
                yield results.pop(emitted) if emitted in results else shape.empty(path, status, reason)
            emitted += 1

    paths = [entries[i][0] for i in to_decode]
    plan = WorkerPlan(num_workers)  # None: chosen by timing the first batch (cxrcae.infer.workers)
    runner_workers = plan.workers
    for batch in plan.batches(
        paths, loaded.image_size, loaded.resize_mode, batch_size, facts=screen is not None
    ):
        if runner is not None and plan.workers != runner_workers:  # workers chosen after the first batch
            runner, runner_workers = make_runner(plan.workers), plan.workers
        for j, path, reason in batch.errors:
            results[to_decode[j]] = shape.empty(path, "error", reason)
        if batch.indices:
            with plan.computing():
                images = batch.images.to(dev, non_blocking=True)
                if explainer is not None:
                    outputs, cams = explainer(images)
                elif runner is not None:
                    outputs = torch.from_numpy(runner(batch.images.numpy()))
                else:
                    with torch.inference_mode(), autocast(dev, dtype), threads_beside(dev, plan.workers):
                        outputs = net(images)
                probs = loaded.probabilities(outputs)
                verdicts = screen.check(batch.images, batch.facts) if screen is not None else None
            for row, (j, path) in enumerate(zip(batch.indices, batch.paths)):
                pred = shape.answer(path, probs[row])
                if verdicts is not None:
                    shape.screened(pred, verdicts[row])
                if files_namer is not None and pred.ok:
                    name = files_namer(path).name
                    gray = batch.images[row, 0].numpy()
                    written = loaded.task.prediction_files(
                        files_namer.folder, name, gray, probs[row], loaded.config
                    )
                    pred.values.update(written)
                if explainer is not None:
                    pred.files[EXPLANATION] = _explain_one(namer, path, batch.images[row], cams[row])
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


def check_backend(backend: str, device: str, precision: str, explain_dir: Any) -> str:
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


def _files_namer(files_dir: str | Path | None) -> UniqueNames | None:
    """Unique per-input names (no extension) for ``Task.prediction_files`` in ``files_dir``."""
    if files_dir is None:
        return None
    out = Path(files_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    return UniqueNames(out, "")


def _written_stems(row: dict[str, Any], folder: Path) -> set[str]:
    """The per-input names of the files an earlier run wrote into ``folder`` for ``row``."""
    stems = set()
    for value in row.values():
        if isinstance(value, str) and value and Path(value).parent == folder:
            stems.add(Path(value).name.split(".")[0])
    return stems


def predict(paths: Iterable[str | Path] | str | Path, model: Any = None, **kwargs: Any) -> list[Prediction]:
    """Run a model over files, folders or globs: one ``Prediction`` per file in input order
    (``iter_predictions``).

    >>> rows = cxrcae.predict(["scan1.png", "folder/"], model="runs/finetune")  # doctest: +SKIP
    >>> rows[0].label, rows[0].probabilities                                    # doctest: +SKIP
    """
    return list(iter_predictions(paths, model, **kwargs))
