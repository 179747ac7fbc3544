"""A classifier as an ONNX file for onnxruntime: exported, checked against PyTorch, and run.

``export_onnx`` writes the classifier's logits graph (input ``image``: float32 ``(batch, 3, S, S)`` in
[0, 1], the batch dimension dynamic; output ``logits``) with PyTorch's TorchScript-based exporter. Before
anything is written, the file is run with onnxruntime next to PyTorch on a batch of random images in [0, 1]
(and on real images when given) and refused when the logits differ by more than ``tolerance``. What the
checkpoint says about its input and output goes into the file's ``metadata_props`` (keys ``cxrcae.*``):
weights sha256, class names, image size, resize mode, preprocessing and temperature, so that
``OnnxClassifier.check_matches`` can refuse an ``.onnx`` that belongs to another checkpoint.

Probabilities are not in the graph: they stay ``softmax(logits / T)`` with the temperature of the
checkpoint's config.json, so calibrating a checkpoint after the export needs no new export.

Every entry point takes the model resolved once (a ``LoadedModel``, or anything ``as_loaded`` turns into
one: folder, Hub id, ``load_model`` object; the bundled classifier when None) and refuses, in one line, a
model whose task has no ``onnx`` option: the graph, its metadata and the probabilities are a classifier's.

onnx and onnxruntime are optional (``pip install "cxrcae[onnx]"``): this module imports without them and
says what to install when they are needed.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrcae import __version__, bundled
from cxrcae._atomic import atomic_write_bytes
from cxrcae.data.stream import iter_batches
from cxrcae.errors import CheckpointError, CxrcaeError
from cxrcae.hub.resolve import LoadedModel, in_hub_cache
from cxrcae.infer.batches import answering_model
from cxrcae.io import find_images
from cxrcae.models.checkpoint import DEFAULT_PREPROCESSING, WEIGHTS_NAME, model_temperature
from cxrcae.progress import ProgressFn, no_progress

try:  # optional: the [onnx] extra
    import onnxruntime as ort

    HAVE_ONNXRUNTIME = True
except ImportError:  # pragma: no cover - depends on the environment
    ort = None
    HAVE_ONNXRUNTIME = False

try:  # optional: the [onnx] extra (writing the metadata of an exported file)
    import onnx

    HAVE_ONNX = True
except ImportError:  # pragma: no cover - depends on the environment
    onnx = None
    HAVE_ONNX = False

ONNX_NAME = "model.onnx"
"""What ``export_onnx`` writes into a checkpoint folder and ``predict --backend onnxruntime`` reads."""
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
OPSETS = range(13, 21)  # what torch's TorchScript-based exporter writes and onnxruntime >= 1.18 runs
TOLERANCE = 1e-3
"""Largest max-abs difference of logits between onnxruntime and PyTorch that an export accepts."""
META = "cxrcae."
INSTALL_HINT = 'pip install "cxrcae[onnx]"'


def require_onnxruntime() -> None:
    """Raise a one-line error naming the extra to install when onnxruntime is missing."""
    if not HAVE_ONNXRUNTIME:
        raise CxrcaeError(f"the onnxruntime backend needs onnxruntime: {INSTALL_HINT}")


def _require_export() -> None:
    missing = [name for name, have in (("onnx", HAVE_ONNX), ("onnxruntime", HAVE_ONNXRUNTIME)) if not have]
    if missing:
        raise CxrcaeError(f"ONNX export needs {' and '.join(missing)}: {INSTALL_HINT}")


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote and how closely onnxruntime matched PyTorch on it."""

    path: Path
    size_bytes: int
    opset: int
    image_size: int
    class_names: list[str]
    weights_sha256: str
    max_abs_diff_logits: float
    max_abs_diff_probabilities: float
    random_checked: int
    images_checked: int
    check_failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["path"] = str(self.path)
        row["check_failures"] = [list(f) for f in self.check_failures]
        return row


class OnnxClassifier:
    """An exported classifier in an onnxruntime ``InferenceSession`` (CPU): ``runner(batch) -> logits``.

    ``batch`` is a float32 numpy array ``(B, 3, S, S)`` in [0, 1] (what ``iter_batches`` decodes); the
    result is float32 ``(B, n_classes)``. ``metadata`` holds the file's ``cxrcae.*`` properties.
    """

    def __init__(self, model: str | Path | bytes, threads: int | None = None):
        require_onnxruntime()
        self.path = None if isinstance(model, bytes) else Path(model)
        where = "the exported model" if self.path is None else str(self.path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        source = model if isinstance(model, bytes) else str(self.path)
        try:
            self.session = ort.InferenceSession(
                source, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's own error types; a bad file is the user's to fix
            first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise CxrcaeError(f"{where}: onnxruntime cannot load it ({first})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run(None, {self.input_name: batch})[0]

    def check_matches(self, config: dict[str, Any], folder: Path, redo: str = "") -> None:
        """Refuse a file exported from another checkpoint than ``folder`` (weights, classes or size)."""
        meta = self.metadata
        redo = redo or f"re-export it: cxrcae export {folder} --onnx"
        if f"{META}weights_sha256" not in meta:
            raise CheckpointError(f"{self.path}: no cxrcae metadata (not written by cxrcae export); {redo}")
        expected = weights_sha256(folder, config)
        found = meta[f"{META}weights_sha256"]
        if found != expected:
            raise CheckpointError(
                f"{self.path} was exported from another checkpoint (weights sha256 {found[:12]}..., "
                f"{folder} has {expected[:12]}...); {redo}"
            )
        names = json.loads(meta.get(f"{META}class_names", "[]"))
        if names != list(config["class_names"]) or meta.get(f"{META}image_size") != str(config["image_size"]):
            raise CheckpointError(
                f"{self.path}: class names or image size differ from {folder}/config.json; {redo}"
            )


def weights_sha256(folder: Path | None, config: dict[str, Any]) -> str:
    """The checkpoint's weights hash: as recorded in config.json, else hashed from the file; "" in memory."""
    if folder is None:
        return ""
    recorded = config.get("weights_sha256")
    if recorded:
        return str(recorded)
    return hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()


def _model_ref(model: Any) -> Any:
    if model is not None and model != "":
        return model
    return bundled.require(
        bundled.bundled_classifier(),
        "model",
        "pass a fine-tuned checkpoint folder or a Hub id user/repo",
    )


def onnx_model(model: Any, *, weights: bool = True) -> LoadedModel:
    """``model`` resolved once (the bundled classifier when None; weights on the CPU unless ``weights`` is
    False), refused in one line unless its task has ONNX export (``onnx``)."""
    loaded = answering_model(_model_ref(model), "cpu", weights=weights)
    loaded.task.require_option("onnx", "ONNX export")
    return loaded


def fp32_classifier(loaded: LoadedModel) -> tuple[nn.Module, dict[str, Any], str]:
    """(fp32 network on the CPU in eval mode, config, weights sha256) of ``loaded``; an in-memory network
    or one on another device is copied: exporting must not move it or change its dtype or mode."""
    if loaded.net is None:
        net = loaded.with_weights("cpu").net
    elif loaded.folder is None or next(loaded.net.parameters()).device.type != "cpu":
        net = copy.deepcopy(loaded.net).cpu()
    else:
        net = loaded.net
    return net.float().eval(), loaded.config, weights_sha256(loaded.folder, loaded.config)


def _default_output(folder: Path | None, ref: Any) -> Path:
    """``<folder>/model.onnx`` for a local folder cxrcae may write into; otherwise ask for --output."""
    if folder is None:
        raise CxrcaeError("an in-memory model has no folder to export into; give an output path")
    why = read_only_reason(folder)
    if why is None:
        return folder / ONNX_NAME
    raise CxrcaeError(f"{ref} is {why}; pass --output PATH.onnx")


def read_only_reason(folder: Path) -> str | None:
    """Why cxrcae must not write into checkpoint ``folder`` (Hub cache, installed package, no permission)."""
    if in_hub_cache(folder):
        return "a Hub download (a read-only cache snapshot)"
    if folder.resolve().is_relative_to(bundled.PACKAGE_DIR):
        return "the bundled model inside the installed package"
    if not os.access(folder, os.W_OK):
        return "a folder you cannot write to"
    return None


def _metadata(config: dict[str, Any], sha: str) -> dict[str, str]:
    size = int(config["image_size"])
    return {
        "kind": "classifier",
        "cxrcae_version": __version__,
        "weights_sha256": sha,
        "class_names": json.dumps(list(config["class_names"])),
        "image_size": str(size),
        "resize_mode": str(config.get("resize_mode", "stretch")),
        "preprocessing": json.dumps({k: config.get(k, v) for k, v in DEFAULT_PREPROCESSING.items()}),
        "temperature": repr(float(model_temperature(config))),
        "head": str(config.get("head", "")),
        "input": f"{INPUT_NAME}: float32 (batch, 3, {size}, {size}) in [0, 1], decoded as predict does",
        "output": f"{OUTPUT_NAME}: probabilities are softmax(logits / temperature)",
    }


def classifier_proto(net: nn.Module, config: dict[str, Any], sha: str, opset: int = DEFAULT_OPSET):
    """The classifier's logits graph as a checked ``onnx.ModelProto`` carrying the ``cxrcae.*`` metadata."""
    _require_export()
    proto = onnx.load_from_string(_export_bytes(net, int(config["image_size"]), int(opset)))
    set_metadata(proto, _metadata(config, sha))
    onnx.checker.check_model(proto)
    return proto


def set_metadata(proto, values: dict[str, str]) -> None:
    """Set ``cxrcae.<key>`` metadata properties of ``proto`` (replacing any of the same key)."""
    keys = {f"{META}{key}" for key in values}
    kept = [(e.key, e.value) for e in proto.metadata_props if e.key not in keys]
    del proto.metadata_props[:]
    for key, value in [*kept, *((f"{META}{k}", v) for k, v in values.items())]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _export_bytes(net: nn.Module, image_size: int, opset: int) -> bytes:
    dummy = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter's deprecation note and tracer notes on shape checks
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                net,
                (dummy,),
                buffer,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        except (RuntimeError, ValueError) as exc:
            first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise CxrcaeError(f"ONNX export failed at opset {opset} ({first})") from None
    return buffer.getvalue()


def _check_batches(config: dict[str, Any], check_images: Any, batch_size: int):
    """(name, float32 batch) to compare on: random images in [0, 1], then the readable ``check_images``."""
    size = int(config["image_size"])
    rng = np.random.default_rng(0)
    yield "random", rng.random((3, 3, size, size), dtype=np.float32)
    if check_images is None:
        return
    items = [check_images] if isinstance(check_images, (str, Path)) else list(check_images)
    files, skipped = find_images(items)
    if not files:
        raise CxrcaeError(f"no images to check in {', '.join(map(str, items))}")
    missing = [
        (-1, str(path), reason)
        for path, reason in skipped
        if reason in ("no such file or directory", "no match")
    ]
    if missing:
        yield "errors", missing
    mode = config.get("resize_mode", "stretch")
    for batch in iter_batches(files, size, mode, batch_size=batch_size):
        yield "errors", batch.errors
        if batch.indices:
            yield "images", batch.images.numpy()


def export_onnx(
    model_ref: Any = None,
    out_path: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    check_images: Any = None,
    tolerance: float = TOLERANCE,
    batch_size: int = 16,
    progress: ProgressFn = no_progress,
) -> ExportResult:
    """Export a classifier (folder, Hub id, ``load_model`` object or ``LoadedModel``; the bundled one when
    None) to ONNX.

    ``out_path`` defaults to ``<checkpoint folder>/model.onnx`` (only for a local folder cxrcae may write
    into); a folder means ``<folder>/model.onnx``. The file is checked with onnxruntime against PyTorch
    (random images, plus ``check_images``: files, folders or globs) and written, atomically, only when the
    logits agree within ``tolerance``.
    """
    _require_export()
    if int(opset) not in OPSETS:
        raise CxrcaeError(f"opset {opset} is not supported; use {OPSETS.start}..{OPSETS.stop - 1}")
    start = time.perf_counter()
    loaded = onnx_model(model_ref)
    if out_path is None:
        target = _default_output(loaded.folder, loaded.ref)
    else:
        target = Path(out_path).expanduser()
        if target.is_dir():
            target = target / ONNX_NAME
    net, config, sha = fp32_classifier(loaded)
    size = int(config["image_size"])

    progress("onnx export", 0, 1)
    data = classifier_proto(net, config, sha, int(opset)).SerializeToString()
    progress("onnx export", 1, 1)

    runner = OnnxClassifier(data)
    temperature = model_temperature(config)
    diff_logits = diff_probs = 0.0
    counts = {"random": 0, "images": 0}
    failures: list[tuple[str, str]] = []
    for what, batch in _check_batches(config, check_images, batch_size):
        if what == "errors":
            failures += [(path, reason) for _, path, reason in batch]
            continue
        with torch.inference_mode():
            ref_logits = net(torch.from_numpy(batch)).float()
        got = torch.from_numpy(runner(batch))
        diff_logits = max(diff_logits, float((got - ref_logits).abs().max()))
        ref_p, got_p = (torch.softmax(t / temperature, dim=1) for t in (ref_logits, got))
        diff_probs = max(diff_probs, float((got_p - ref_p).abs().max()))
        counts[what] += len(batch)
        progress("onnx check", counts["random"] + counts["images"], None, f"max |diff| {diff_logits:.1e}")
    if check_images is not None and counts["images"] == 0:
        raise CxrcaeError(f"none of the {len(failures)} check image(s) could be read; nothing written")
    if not diff_logits <= tolerance:  # also refuses NaN
        raise CxrcaeError(
            f"onnxruntime's logits differ from PyTorch's by up to {diff_logits:.2e} (limit {tolerance:g}); "
            "nothing written"
        )
    atomic_write_bytes(target, data)
    return ExportResult(
        path=target,
        size_bytes=len(data),
        opset=int(opset),
        image_size=size,
        class_names=list(config["class_names"]),
        weights_sha256=sha,
        max_abs_diff_logits=diff_logits,
        max_abs_diff_probabilities=diff_probs,
        random_checked=counts["random"],
        images_checked=counts["images"],
        check_failures=failures,
        seconds=time.perf_counter() - start,
    )


def onnx_classifier(
    loaded: LoadedModel, progress: ProgressFn = no_progress, threads: int | None = None
) -> OnnxClassifier:
    """The onnxruntime runner of a resolved classifier, for ``predict --backend onnxruntime``
    (``threads``: onnxruntime's intra-op threads; None: its default, one per core).

    A checkpoint folder's ``model.onnx`` is used when present (refused when it belongs to another
    checkpoint); otherwise, and for in-memory models, the model is exported (and checked) into a temporary
    file that is gone once the session has loaded it.
    """
    require_onnxruntime()
    loaded.task.require_option("onnx", "the onnxruntime backend")
    if loaded.folder is not None:
        existing = loaded.folder / ONNX_NAME
        if existing.is_file():
            runner = OnnxClassifier(existing, threads)
            runner.check_matches(loaded.config, loaded.folder)
            return runner
    with tempfile.TemporaryDirectory(prefix="cxrcae-onnx-") as tmp:
        result = export_onnx(loaded, Path(tmp) / ONNX_NAME, progress=progress)
        return OnnxClassifier(result.path, threads)
