"""The int8 fast path: a classifier's ONNX graph with int8 convolutions, used only where it agrees with fp32.

``quantize_onnx`` exports the classifier as ``export_onnx`` does, quantizes its convolutions with
onnxruntime's static quantization (QDQ format, per-channel int8 weights, uint8 activations whose ranges
come from min/max calibration over training images) and measures ``agreement`` with the PyTorch fp32 model
on held-out images: top-1 agreement and the largest difference of any class probability. It tries all
convolutions in int8 first, then keeps the last one, then the last two in fp32 (the features the head reads
are where rounding moves probabilities most; measured on the bundled model), and writes the first graph
whose figures are within the bar, or else the closest one with its failing figures recorded.

The bar (``AGREEMENT_BAR``): the same top-1 class on at least 99.5% of at least 200 images and no class
probability off by more than 0.02. The figures go into the file's metadata (``cxrcae.agreement``) and a
readable ``<name>.agreement.json`` beside it; ``predict --backend onnxruntime-int8`` refuses a file whose
figures miss the bar unless forced, so fp32 stays the default wherever the fast path is not good enough for
the model at hand.

Where the file goes: ``<checkpoint>/model.int8.onnx``; for a folder cxrcae may not write into (the bundled
model, a Hub download) ``$CXRCAE_HOME/onnx/<weights sha256[:16]>/model.int8.onnx``, where predict looks
next. onnx and onnxruntime are optional (the ``[onnx]`` extra).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrcae._atomic import atomic_write_bytes, atomic_write_text
from cxrcae.data.records import load_records
from cxrcae.data.stream import iter_batches
from cxrcae.errors import CheckpointError, CxrcaeError
from cxrcae.hub.resolve import LoadedModel
from cxrcae.infer.onnx import (
    DEFAULT_OPSET,
    HAVE_ONNX,
    HAVE_ONNXRUNTIME,
    INPUT_NAME,
    INSTALL_HINT,
    META,
    OnnxClassifier,
    classifier_proto,
    fp32_classifier,
    onnx_model,
    read_only_reason,
    require_onnxruntime,
    set_metadata,
    weights_sha256,
)
from cxrcae.io import find_images
from cxrcae.models.checkpoint import model_temperature
from cxrcae.paths import home_dir
from cxrcae.progress import ProgressFn, no_progress

try:  # optional: the [onnx] extra
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    HAVE_QUANTIZATION = HAVE_ONNX and HAVE_ONNXRUNTIME
except ImportError:  # pragma: no cover - depends on the environment
    onnx = None
    CalibrationDataReader = object
    HAVE_QUANTIZATION = False

INT8_NAME = "model.int8.onnx"
"""What ``quantize_onnx`` writes and ``predict --backend onnxruntime-int8`` reads."""
AGREEMENT_BAR = {"min_images": 200, "min_top1": 0.995, "max_prob_diff": 0.02}
"""What the int8 graph must reach against fp32 before predict uses it without being forced."""
CALIBRATION_IMAGES = 200
AGREEMENT_IMAGES = 500
FP32_TAILS = (0, 1, 2)
"""How many of the last convolutions stay in fp32, tried in this order until the bar is met."""
QUANTIZED_OPS = ("Conv", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Add")
"""The encoder's operators; the head (LSTM, dense layers) stays fp32: quantizing it doubled the largest
probability difference on the bundled model for no measurable speed."""
_WORST = 5


def _require_quantization() -> None:
    if not HAVE_QUANTIZATION:
        raise CxrcaeError(f"int8 quantization needs onnx and onnxruntime: {INSTALL_HINT}")


@dataclass
class Agreement:
    """How closely a fast path's probabilities follow fp32 on ``images`` images (``agreement``)."""

    images: int
    top1: float
    max_prob_diff: float
    disagreements: list[str] = field(default_factory=list)
    worst: list[tuple[str, float]] = field(default_factory=list)

    @property
    def within_bar(self) -> bool:
        """Top-1 agreement and largest difference within ``AGREEMENT_BAR``, however few the images."""
        return self.top1 >= AGREEMENT_BAR["min_top1"] and self.max_prob_diff <= AGREEMENT_BAR["max_prob_diff"]

    @property
    def meets_bar(self) -> bool:
        """``within_bar`` on at least ``AGREEMENT_BAR["min_images"]`` images: evidence enough to use it."""
        return self.within_bar and self.images >= AGREEMENT_BAR["min_images"]

    def summary(self) -> str:
        return (
            f"top-1 agreement {self.top1:.2%} on {self.images} image(s), "
            f"max probability difference {self.max_prob_diff:.4f}"
        )

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["worst"] = [list(w) for w in self.worst]
        row["meets_bar"] = self.meets_bar
        row["bar"] = dict(AGREEMENT_BAR)
        return row

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Agreement:
        return cls(
            images=int(row["images"]),
            top1=float(row["top1"]),
            max_prob_diff=float(row["max_prob_diff"]),
            disagreements=[str(p) for p in row.get("disagreements", [])],
            worst=[(str(p), float(d)) for p, d in row.get("worst", [])],
        )


def agreement(reference: np.ndarray, probs: np.ndarray, names: Sequence[str] | None = None) -> Agreement:
    """Top-1 agreement and largest absolute probability difference of ``probs`` against ``reference``.

    Both are ``(n_images, n_classes)`` probabilities of the same images in the same order; ``names`` (paths)
    label the images that disagree and the ``_WORST`` largest differences. A NaN anywhere fails the bar.
    """
    reference, probs = np.asarray(reference, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    if reference.shape != probs.shape or reference.ndim != 2:
        raise CxrcaeError(
            f"agreement needs two (images, classes) arrays of one shape: {reference.shape}, {probs.shape}"
        )
    n = len(reference)
    if n == 0:
        return Agreement(0, 0.0, float("inf"))
    labels = [str(x) for x in names] if names is not None else [str(i) for i in range(n)]
    same = reference.argmax(1) == probs.argmax(1)
    diff = np.abs(reference - probs).max(1)
    diff = np.where(np.isfinite(diff), diff, np.inf)
    order = np.argsort(-diff, kind="stable")[:_WORST]
    return Agreement(
        images=n,
        top1=float(same.mean()),
        max_prob_diff=float(diff.max()),
        disagreements=[labels[i] for i in np.flatnonzero(~same)],
        worst=[(labels[i], float(diff[i])) for i in order],
    )


@dataclass
class QuantizeResult:
    """What ``quantize_onnx`` wrote and how its int8 graph agrees with fp32."""

    path: Path
    agreement_path: Path
    size_bytes: int
    image_size: int
    class_names: list[str]
    weights_sha256: str
    calibration_images: int
    agreement: Agreement
    fp32_layers: list[str]
    tried: list[dict[str, Any]] = field(default_factory=list)
    agreement_source: str = ""
    check_failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def meets_bar(self) -> bool:
        return self.agreement.meets_bar

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["path"], row["agreement_path"] = str(self.path), str(self.agreement_path)
        row["agreement"] = self.agreement.to_dict()
        row["meets_bar"] = self.meets_bar
        row["check_failures"] = [list(f) for f in self.check_failures]
        return row


def image_paths(items: Any) -> tuple[list[str], list[tuple[str, str]]]:
    """Files, folders, globs and manifest CSVs (``load_records``) -> (image paths, (item, why) failures)."""
    if items is None:
        return [], []
    items = [items] if isinstance(items, (str, Path)) else list(items)
    paths: list[str] = []
    failures: list[tuple[str, str]] = []
    for item in items:
        p = Path(item).expanduser()
        if p.suffix.lower() in (".csv", ".tsv") and p.is_file():
            paths += [str(r.path) for r in load_records(p, labeled=False)]
            continue
        files, skipped = find_images([item])
        paths += [str(f) for f in files]
        failures += [(str(f), why) for f, why in skipped if why in ("no such file or directory", "no match")]
    return list(dict.fromkeys(paths)), failures


def int8_cache_path(sha: str) -> Path:
    """Where the int8 graph of a checkpoint cxrcae may not write into is kept, by weights hash."""
    return home_dir() / "onnx" / sha[:16] / INT8_NAME


def _default_output(folder: Path | None, sha: str) -> Path:
    if folder is None:
        raise CxrcaeError("an in-memory model has no folder to write into; give an output path")
    if read_only_reason(folder) is None:
        return folder / INT8_NAME
    return int8_cache_path(sha)


def _split(paths: list[str], n_calibration: int, n_agreement: int, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint, seeded samples: calibration (at most half when images are few and some must be held out
    for agreement, ``n_agreement`` > 0), then agreement."""
    order = np.random.default_rng(seed).permutation(len(paths))
    shuffled = [paths[i] for i in order]
    room = max(1, len(paths) // 2) if n_agreement else len(paths)
    n_cal = min(int(n_calibration), room) if paths else 0
    return shuffled[:n_cal], shuffled[n_cal : n_cal + int(n_agreement)]


def _decode(paths: list[str], config: dict[str, Any], batch_size: int, what: str, progress: ProgressFn):
    """(gray float32 (n, S, S) model inputs, their paths, (path, reason) failures); channel 0 only, since
    every input is gray replicated to three channels, to keep a few hundred images in memory."""
    size, mode = int(config["image_size"]), config.get("resize_mode", "stretch")
    chunks, ok, failures = [], [], []
    for batch in iter_batches(paths, size, mode, batch_size=batch_size):
        failures += [(path, reason) for _, path, reason in batch.errors]
        if batch.indices:
            chunks.append(batch.images[:, 0].numpy().copy())
            ok += batch.paths
        progress(what, len(ok) + len(failures), len(paths))
    gray = np.concatenate(chunks) if chunks else np.zeros((0, size, size), np.float32)
    return gray, ok, failures


def _batches(gray: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(gray), batch_size):
        chunk = gray[i : i + batch_size]
        yield np.ascontiguousarray(np.broadcast_to(chunk[:, None], (len(chunk), 3, *chunk.shape[1:])))


class _Calibration(CalibrationDataReader):
    """onnxruntime's calibration feed: the decoded calibration images, batch by batch."""

    def __init__(self, gray: np.ndarray, batch_size: int):
        self.gray, self.batch_size = gray, batch_size
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._it = _batches(self.gray, self.batch_size)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizer prints and logs notes (on the root logger) that say nothing to a user."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return False

    root, drop = logging.getLogger(), _Drop()
    root.addFilter(drop)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(drop)


def _probabilities(run, gray: np.ndarray, temperature: float, batch_size: int) -> np.ndarray:
    logits = np.concatenate(
        [np.asarray(run(batch), dtype=np.float32) for batch in _batches(gray, batch_size)]
    )
    return torch.softmax(torch.from_numpy(logits) / temperature, dim=1).numpy()


def quantize_onnx(
    model_ref: Any = None,
    out_path: str | Path | None = None,
    *,
    calibrate: Any,
    check_images: Any = None,
    calibration_images: int = CALIBRATION_IMAGES,
    agreement_images: int = AGREEMENT_IMAGES,
    opset: int = DEFAULT_OPSET,
    batch_size: int = 16,
    seed: int = 0,
    progress: ProgressFn = no_progress,
) -> QuantizeResult:
    """Write the int8 graph of a classifier (folder, Hub id, in-memory model or ``LoadedModel``; bundled when
    None) with its measured agreement with fp32 (see the module docstring).

    ``calibrate``: training images (files, folders, globs or a manifest CSV); a seeded sample of
    ``calibration_images`` calibrates the activation ranges. Agreement is measured on ``check_images`` when
    given (never calibrated on), else on up to ``agreement_images`` other images of ``calibrate``.
    ``out_path`` defaults to ``<folder>/model.int8.onnx`` (the cache for read-only folders; see the module
    docstring); a folder means ``<folder>/model.int8.onnx``. The file is written even when it misses the bar
    (its figures say so)."""
    _require_quantization()
    start = time.perf_counter()
    loaded = onnx_model(model_ref)
    net, config, sha = fp32_classifier(loaded)
    if out_path is None:
        target = _default_output(loaded.folder, sha)
    else:
        target = Path(out_path).expanduser()
        if target.is_dir():
            target = target / INT8_NAME
    pool, failures = image_paths(calibrate)
    check_paths, source = [], "held-out calibration data"
    if check_images is not None:
        check_paths, check_missing = image_paths(check_images)
        failures += check_missing
        source = "check images"
        checked = {os.path.abspath(p) for p in check_paths}
        pool = [p for p in pool if os.path.abspath(p) not in checked]  # never calibrate on what is measured
    if not pool:
        raise CxrcaeError(f"no calibration images found in {calibrate} (besides the check images)")
    cal_paths, held_out = _split(
        pool, calibration_images, 0 if check_images is not None else agreement_images, seed
    )
    if check_images is None:
        check_paths = held_out
    if not check_paths:
        raise CxrcaeError(
            "no images left to measure agreement on; give check images or more calibration images"
        )

    cal, _, bad = _decode(cal_paths, config, batch_size, "int8 calibration images", progress)
    failures += bad
    if len(cal) == 0:
        raise CxrcaeError(f"none of the {len(cal_paths)} calibration image(s) could be read; nothing written")
    gray, names, bad = _decode(check_paths, config, batch_size, "int8 agreement images", progress)
    failures += bad
    if len(gray) == 0:
        raise CxrcaeError(f"none of the {len(check_paths)} agreement image(s) could be read; nothing written")
    temperature = model_temperature(config)

    def fp32(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(batch)).float().numpy()

    reference = _probabilities(fp32, gray, temperature, batch_size)
    proto = classifier_proto(net, config, sha, opset)
    tried: list[dict[str, Any]] = []
    chosen: tuple[bytes, Agreement, list[str]] | None = None
    with tempfile.TemporaryDirectory(prefix="cxrcae-int8-") as tmp:
        plain, prepared = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx"
        onnx.save(proto, str(plain))
        with _quiet():
            quant_pre_process(str(plain), str(prepared))
        convs = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv"]
        tails = [k for k in FP32_TAILS if k < len(convs)] or [0]
        for step, tail in enumerate(tails):
            keep = convs[len(convs) - tail :] if tail else []
            progress("int8 quantize", step, len(tails), f"{tail} conv(s) in fp32")
            out = Path(tmp) / f"int8-{tail}.onnx"
            with _quiet():
                quantize_static(
                    str(prepared),
                    str(out),
                    _Calibration(cal, batch_size),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(QUANTIZED_OPS),
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=keep,
                )
            data = out.read_bytes()
            probs = _probabilities(OnnxClassifier(data), gray, temperature, batch_size)
            measured = agreement(reference, probs, names)
            tried.append({"fp32_layers": keep, **measured.to_dict()})
            chosen = (data, measured, keep)
            if measured.within_bar:  # the most int8 that agrees; few images only weaken the evidence
                break
        progress("int8 quantize", len(tails), len(tails))
    assert chosen is not None
    data, measured, keep = chosen
    quantized = onnx.load_from_string(data)
    record = {
        **measured.to_dict(),
        "source": source,
        "calibration_images": len(cal),
        "fp32_layers": keep,
        "quantization": "onnxruntime static QDQ, int8 per-channel weights, uint8 activations, min/max",
    }
    set_metadata(quantized, {"precision": "int8", "agreement": json.dumps(record)})
    data = quantized.SerializeToString()
    atomic_write_bytes(target, data)
    side = target.with_name(f"{target.stem}.agreement.json")
    atomic_write_text(side, json.dumps({**record, "file": target.name, "tried": tried}, indent=1) + "\n")
    return QuantizeResult(
        path=target,
        agreement_path=side,
        size_bytes=len(data),
        image_size=int(config["image_size"]),
        class_names=list(config["class_names"]),
        weights_sha256=sha,
        calibration_images=len(cal),
        agreement=measured,
        fp32_layers=keep,
        tried=tried,
        agreement_source=source,
        check_failures=failures,
        seconds=time.perf_counter() - start,
    )


def recorded_agreement(metadata: dict[str, str]) -> Agreement | None:
    """The agreement an int8 file carries (``cxrcae.agreement``), or None when it has none."""
    raw = metadata.get(f"{META}agreement")
    if not raw:
        return None
    try:
        return Agreement.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        return None


def int8_classifier(loaded: LoadedModel, force: bool = False, threads: int | None = None) -> OnnxClassifier:
    """The int8 runner of a resolved classifier, for ``predict --backend onnxruntime-int8``.

    Reads ``<folder>/model.int8.onnx``, else the cache file of its weights; refuses one built from other
    weights, and (unless ``force``) one whose recorded agreement with fp32 misses ``AGREEMENT_BAR``.
    ``threads``: onnxruntime's intra-op threads (None: one per core).
    """
    require_onnxruntime()
    loaded.task.require_option("onnx", "the onnxruntime-int8 backend")
    folder, config = loaded.folder, loaded.config
    if folder is None:
        raise CxrcaeError("the int8 backend needs a checkpoint folder; save the model and export it first")
    sha = weights_sha256(folder, config)
    build = f"cxrcae export {folder} --onnx --int8 --calibrate TRAINING_IMAGES"
    path = next((p for p in (folder / INT8_NAME, int8_cache_path(sha)) if p.is_file()), None)
    if path is None:
        raise CheckpointError(f"{folder} has no int8 model ({INT8_NAME}); build one with: {build}")
    runner = OnnxClassifier(path, threads)
    runner.check_matches(config, folder, redo=f"rebuild it: {build}")
    measured = recorded_agreement(runner.metadata)
    if measured is None:
        raise CheckpointError(f"{path}: no recorded agreement with fp32; rebuild it: {build}")
    if not measured.meets_bar and not force:
        bar = AGREEMENT_BAR
        raise CxrcaeError(
            f"{path}: int8 {measured.summary()} misses the bar (>= {bar['min_top1']:.1%} on >= "
            f"{bar['min_images']} images, <= {bar['max_prob_diff']}); use --backend onnxruntime, or "
            "--force-int8 to use it anyway"
        )
    return runner
