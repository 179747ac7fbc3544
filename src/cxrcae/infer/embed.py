"""Encoder features for many files, streamed to .npy, .safetensors or .parquet with a row index beside them.

Memory stays flat: images are decoded by ``cxrcae.data.stream.iter_batches`` and each batch of features is
appended to the output as it is computed. Files that cannot be read become ``error`` rows of the sidecar
index CSV (``<output stem>.index.csv``: index, path, status, reason, row) and the run goes on; ``row`` is the
feature row of each ``ok`` file. Outputs are written under a temporary name and renamed when complete.

An interrupted run loses no finished row: each row (features included) is appended to ``OUTPUT.partial`` as
soon as its batch is done (``cxrcae.infer.writers.RowJournal``), and ``resume=True`` (``embed --resume``)
reuses the rows of unchanged files and computes the rest. Rows reach the output in input order, in chunks
of ``batch_size`` feature rows whatever was reused, so a resumed run's files equal an uninterrupted run's.
One command at a time writes an output (``locked_output``).
"""

from __future__ import annotations

import base64
import csv
import json
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrcae._atomic import AtomicFile, as_write_error
from cxrcae.errors import CxrcaeError
from cxrcae.hub.resolve import load_encoder
from cxrcae.infer.workers import WorkerPlan, threads_beside
from cxrcae.infer.writers import RowJournal, locked_output
from cxrcae.io import find_images
from cxrcae.models.encoder import PretrainedEncoder
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import autocast, resolve_device, resolve_precision

FORMATS = {".npy": "npy", ".safetensors": "safetensors", ".parquet": "parquet"}
INDEX_COLUMNS = ("index", "path", "status", "reason", "row")


@dataclass
class EmbedResult:
    """Where ``embed`` wrote the features and their index, how many files it read, and which failed."""

    output: Path
    index_csv: Path
    n_inputs: int
    n_ok: int
    feature_shape: tuple[int, ...]
    seconds: float
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.n_ok / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "index_csv": str(self.index_csv),
            "inputs": self.n_inputs,
            "embedded": self.n_ok,
            "failed": len(self.failures),
            "skipped": len(self.skipped),
            "feature_shape": list(self.feature_shape),
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "failures": [{"index": i, "path": p, "reason": r} for i, p, r in self.failures],
        }


def output_format(path: str | Path) -> str:
    """The writer for ``path``'s extension; parquet needs pyarrow (checked here, before any work)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise CxrcaeError(
            f"{path}: unsupported output type {suffix or '(none)'}; use .npy, .safetensors or .parquet"
        )
    if FORMATS[suffix] == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise CxrcaeError(
                "parquet output needs pyarrow: pip install pyarrow (or use .npy / .safetensors)"
            ) from None
    return FORMATS[suffix]


def index_path(output: str | Path) -> Path:
    """The index CSV beside a features file: ``feats.npy`` -> ``feats.index.csv``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.index.csv")


# ----------------------------------------------------------------------------------------------- writers


class _NpyWriter:
    """A .npy whose fixed-size header is rewritten with the final row count (rows appended as computed)."""

    HEADER = 128

    def __init__(self, path: Path, metadata: dict[str, str]):
        self.target = AtomicFile(path, "w+b")
        self.f = self.target.file
        self.f.write(b"\0" * self.HEADER)
        self.rows = 0
        self.shape: tuple[int, ...] = ()

    def write(self, features: np.ndarray, indices: list[int], paths: list[str]) -> None:
        self.shape = features.shape[1:]
        self.f.write(np.ascontiguousarray(features, dtype="<f4").tobytes())
        self.rows += len(features)

    def close(self) -> None:
        header = repr({"descr": "<f4", "fortran_order": False, "shape": (self.rows, *self.shape)})
        body = header.encode("latin1")
        pad = self.HEADER - 10 - len(body) - 1
        if pad < 0:
            raise CxrcaeError("feature shape too long for the .npy header")  # pragma: no cover
        self.f.seek(0)
        self.f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", self.HEADER - 10) + body + b" " * pad + b"\n")
        self.target.commit(rename=False)  # renamed with the index, by embed

    def discard(self) -> None:
        self.target.discard()


class _SafetensorsWriter:
    """``features`` (rows, ...) float32 and ``input_index`` int64 (position of each row in the inputs).

    The JSON header gets a fixed reserved size (safetensors allows space padding), so features stream to
    disk and the header is filled in at the end; the small index tensor follows the features.
    """

    RESERVED = 8192

    def __init__(self, path: Path, metadata: dict[str, str]):
        self.target = AtomicFile(path, "w+b")
        self.metadata = metadata
        self.f = self.target.file
        self.f.write(b"\0" * (8 + self.RESERVED))
        self.rows = 0
        self.nbytes = 0
        self.shape: tuple[int, ...] = ()
        self.indices: list[int] = []

    def write(self, features: np.ndarray, indices: list[int], paths: list[str]) -> None:
        self.shape = features.shape[1:]
        data = np.ascontiguousarray(features, dtype="<f4").tobytes()
        self.f.write(data)
        self.nbytes += len(data)
        self.rows += len(features)
        self.indices += indices

    def close(self) -> None:
        index = np.asarray(self.indices, dtype="<i8").tobytes()
        self.f.write(index)
        header = {
            "__metadata__": self.metadata,
            "features": {"dtype": "F32", "shape": [self.rows, *self.shape], "data_offsets": [0, self.nbytes]},
            "input_index": {
                "dtype": "I64",
                "shape": [self.rows],
                "data_offsets": [self.nbytes, self.nbytes + len(index)],
            },
        }
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > self.RESERVED:
            raise CxrcaeError("safetensors metadata too long")  # pragma: no cover
        self.f.seek(0)
        self.f.write(struct.pack("<Q", self.RESERVED) + text + b" " * (self.RESERVED - len(text)))
        self.target.commit(rename=False)  # renamed with the index, by embed

    def discard(self) -> None:
        self.target.discard()


class _ParquetWriter:
    """Columns index (int64), path (string), features (fixed-size list of float32, flattened per row)."""

    def __init__(self, path: Path, metadata: dict[str, str]):
        self.target = AtomicFile(path, "wb")
        self.metadata = metadata
        self.writer = None
        self.rows = 0
        self.shape: tuple[int, ...] = ()

    def write(self, features: np.ndarray, indices: list[int], paths: list[str]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.shape = features.shape[1:]
        flat = np.ascontiguousarray(features.reshape(len(features), -1), dtype=np.float32)
        width = flat.shape[1]
        values = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), width)
        table = pa.table(
            {"index": pa.array(indices, pa.int64()), "path": pa.array(paths, pa.string()), "features": values}
        )
        if self.writer is None:
            meta = {**self.metadata, "feature_shape": json.dumps(list(self.shape))}
            schema = table.schema.with_metadata({k: str(v) for k, v in meta.items()})
            self.writer = pq.ParquetWriter(self.target.file, schema)
        self.writer.write_table(table.replace_schema_metadata(self.writer.schema.metadata))
        self.rows += len(features)

    def close(self) -> None:
        if self.writer is None:  # no rows: still leave a valid, empty file
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema(
                [("index", pa.int64()), ("path", pa.string()), ("features", pa.list_(pa.float32()))]
            )
            pq.write_table(schema.empty_table().replace_schema_metadata(self.metadata), self.target.file)
        else:
            self.writer.close()
        self.target.commit(rename=False)  # renamed with the index, by embed

    def discard(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()  # pyarrow's writer owns the file object; the file goes anyway
            except Exception:
                pass
        self.target.discard()


_WRITERS = {"npy": _NpyWriter, "safetensors": _SafetensorsWriter, "parquet": _ParquetWriter}


# ----------------------------------------------------------------------------------------------- embed


def embed(
    inputs: Sequence[str | Path],
    model: str | Path | PretrainedEncoder,
    output: str | Path,
    *,
    pooled: bool = True,
    batch_size: int = 32,
    num_workers: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    recursive: bool = True,
    progress: ProgressFn = no_progress,
    resume: bool = False,
) -> EmbedResult:
    """Encode every image in ``inputs`` (files, folders, globs) with ``model``'s encoder into ``output``.

    ``resume``: continue an interrupted run of the same settings from ``OUTPUT.partial`` (module docstring).
    """

    output = Path(output).expanduser()
    fmt = output_format(output)
    if batch_size < 1:
        raise CxrcaeError(f"batch size must be at least 1, got {batch_size}")
    files, skipped = find_images(inputs, recursive=recursive)
    if not files:
        raise CxrcaeError(f"no image files found in {', '.join(map(str, inputs))}")
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    encoder = model if isinstance(model, PretrainedEncoder) else load_encoder(model, pooled=pooled)
    encoder.pooled = pooled
    encoder = encoder.to(dev).eval()
    metadata = {
        "model": str(model) if isinstance(model, (str, Path)) else "in-memory encoder",
        "weights_sha256": str(encoder.cxrcae_config.get("weights_sha256", "")),
        "pooled": str(pooled).lower(),
        "image_size": str(encoder.image_size),
        "resize_mode": encoder.resize_mode,
        "precision": str(dtype or "fp32").replace("torch.", ""),
    }
    settings = {**metadata, "device": str(dev)}
    if fmt == "parquet":  # one row group per batch: the same batch size gives the same file
        settings["batch_size"] = batch_size
    idx_path = index_path(output)
    paths = [str(p) for p in files]
    start = time.perf_counter()
    with locked_output(output, idx_path), RowJournal(output, settings, resume=resume) as journal:
        saved = {i for i, p in enumerate(paths) if journal.has(p)}
        computed = _computed_rows(
            paths, saved, journal, encoder, dev, dtype, batch_size, num_workers, progress
        )
        writer = _WRITERS[fmt](output, metadata)
        index_target = AtomicFile(idx_path, "w", newline="")
        failures: list[tuple[int, str, str]] = []
        try:
            index = _IndexWriter(index_target)
            index.row(INDEX_COLUMNS)
            chunk: list[tuple[int, str, np.ndarray]] = []
            for i, path in enumerate(paths):
                status, reason, feats = _saved_row(journal, path) if i in saved else next(computed)
                if status == "ok":
                    index.row([i, path, "ok", "", writer.rows + len(chunk)])
                    chunk.append((i, path, feats))
                    if len(chunk) == batch_size:
                        _write_chunk(writer, chunk)
                else:
                    failures.append((i, path, reason))
                    index.row([i, path, "error", reason, ""])
            _write_chunk(writer, chunk)
            for path, reason in skipped:
                index.row(["", str(path), "skipped", reason, ""])
            writer.shape = writer.shape or _feature_shape(encoder, pooled)
            writer.close()
            index_target.commit(rename=False)
            writer.target.rename()  # both files are on disk: only two renames left
            index_target.rename()
        except BaseException:
            writer.discard()
            index_target.discard()
            raise
    return EmbedResult(
        output=output,
        index_csv=idx_path,
        n_inputs=len(files),
        n_ok=writer.rows,
        feature_shape=tuple(writer.shape),
        seconds=time.perf_counter() - start,
        failures=failures,
        skipped=[(str(p), r) for p, r in skipped],
    )


def _computed_rows(
    paths: list[str],
    saved: set[int],
    journal: RowJournal,
    encoder: PretrainedEncoder,
    dev: torch.device,
    dtype: torch.dtype | None,
    batch_size: int,
    num_workers: int | None,
    progress: ProgressFn,
) -> Iterator[tuple[str, str, np.ndarray | None]]:
    """(status, reason, features) of each input not in ``saved``, in input order; every batch's rows go
    to the journal before they are handed on."""
    todo = [i for i in range(len(paths)) if i not in saved]
    done, ok = len(saved), 0
    start = time.perf_counter()
    progress("embed", done, len(paths), "")
    plan = WorkerPlan(num_workers)  # None: chosen by timing the first batch, as predict does
    todo_paths = [paths[i] for i in todo]
    for batch in plan.batches(todo_paths, encoder.image_size, encoder.resize_mode, batch_size, facts=False):
        rows: dict[int, tuple[str, str, str, np.ndarray | None]] = {}
        if batch.indices:
            with plan.computing(), torch.inference_mode(), autocast(dev, dtype):
                with threads_beside(dev, plan.workers):
                    feats = encoder(batch.images.to(dev)).float().cpu().numpy()
            for k, (j, p) in enumerate(zip(batch.indices, batch.paths)):
                rows[j] = (p, "ok", "", np.ascontiguousarray(feats[k], dtype="<f4"))
        for j, p, reason in batch.errors:
            rows[j] = (p, "error", reason, None)
        for j in sorted(rows):
            p, status, reason, f = rows[j]
            data: dict[str, Any] = {"row": {"status": status, "reason": reason}}
            if f is not None:
                data |= {"features": base64.b64encode(f.tobytes()).decode("ascii"), "shape": list(f.shape)}
            journal.record(p, data)
        done += len(batch)
        ok += len(batch.indices)
        progress("embed", done, len(paths), f"{ok / max(time.perf_counter() - start, 1e-9):.1f} img/s")
        for j in sorted(rows):
            yield rows[j][1:]


def _saved_row(journal: RowJournal, path: str) -> tuple[str, str, np.ndarray | None]:
    """(status, reason, features) of ``path`` as the interrupted run computed them."""
    record = journal.saved(path)
    row = record["row"]
    if row["status"] != "ok":
        return row["status"], row["reason"], None
    features = np.frombuffer(base64.b64decode(record["features"]), dtype="<f4")
    return "ok", "", features.reshape(record["shape"])


def _write_chunk(writer: Any, chunk: list[tuple[int, str, np.ndarray]]) -> None:
    """Hand ``chunk``'s rows to the output writer as one block and empty it."""
    if chunk:
        feats, indices, paths = (
            np.stack([f for _, _, f in chunk]),
            [i for i, *_ in chunk],
            [p for _, p, _ in chunk],
        )
        try:
            writer.write(feats, indices, paths)
        except OSError as exc:  # a full disk names the output, not a temporary
            raise as_write_error(writer.target.path, exc, own=False) from None
        chunk.clear()


class _IndexWriter:
    """CSV rows into the index's temporary file; a failed write names the index file."""

    def __init__(self, target: AtomicFile):
        self.target = target
        self.csv = csv.writer(target.file)

    def row(self, values: Sequence[Any]) -> None:
        try:
            self.csv.writerow(values)
        except OSError as exc:
            raise as_write_error(self.target.path, exc, own=False) from None


def _feature_shape(encoder: PretrainedEncoder, pooled: bool) -> tuple[int, ...]:
    side = encoder.image_size // encoder.reduction
    return (encoder.num_features,) if pooled else (encoder.num_features, side, side)
