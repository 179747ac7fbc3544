"""What the autoencoder sees: input | reconstruction | absolute error, per image, plus per-image errors.

``reconstruct(cae, paths, out_dir)`` streams the files through the checkpoint's preprocessing, writes one
``<stem>.recon.png`` triptych per image (the error panel on a fixed 0..``error_max`` colour scale so
images compare), an overview ``reconstructions.png`` of the first few, and ``reconstruction.csv`` with
MSE (the pretraining loss), MAE and PSNR per image; unreadable files are error rows.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from cxrcae._atomic import atomic_open, atomic_write_bytes
from cxrcae.data.stream import iter_batches
from cxrcae.infer.batches import UniqueNames, load_for_inference
from cxrcae.infer.prediction import collect_inputs
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import resolve_device

OVERVIEW_ROWS = 8
COLUMNS = ("path", "status", "mse", "mae", "psnr", "image", "reason")


@dataclass
class Reconstruction:
    """One file's row: its reconstruction errors (MSE, MAE, PSNR) and view image, or why it failed."""

    path: str
    status: str = "ok"
    mse: float | None = None
    mae: float | None = None
    psnr: float | None = None
    image: str | None = None
    reason: str = ""


@dataclass
class ReconstructionResult:
    """Every row of a ``reconstruct`` run, the CSV holding them and the overview image."""

    rows: list[Reconstruction]
    out_dir: Path
    csv: Path
    overview: Path | None

    @property
    def n_errors(self) -> int:
        return sum(r.status == "error" for r in self.rows)

    def mean_mse(self) -> float | None:
        values = [r.mse for r in self.rows if r.mse is not None]
        return float(np.mean(values)) if values else None


def triptych(image: np.ndarray, recon: np.ndarray, error_max: float) -> np.ndarray:
    """(H, W) input and reconstruction in [0, 1] -> uint8 RGB ``input | reconstruction | |error|``."""

    gray = lambda a: np.repeat(np.clip(a, 0, 1)[..., None], 3, axis=2)  # noqa: E731
    err = np.abs(recon - image) / max(error_max, 1e-12)
    heat = colormaps["inferno"](np.clip(err, 0, 1))[..., :3]
    sep = np.ones((image.shape[0], 2, 3))
    strip = np.concatenate([gray(image), sep, gray(recon), sep, heat], axis=1)
    return (strip * 255 + 0.5).astype(np.uint8)


def _png(array: np.ndarray) -> bytes:

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _overview(path: Path, strips: list[tuple[str, np.ndarray]], error_max: float) -> Path:

    fig = Figure(figsize=(7.5, 2.5 * len(strips)))
    axes = fig.subplots(len(strips), 1, squeeze=False)[:, 0]
    for ax, (title, strip) in zip(axes, strips):
        ax.imshow(strip)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"input | reconstruction | |error| (0 to {error_max:g})", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def reconstruct(
    model: Any,
    inputs: Iterable[str | Path] | str | Path,
    out_dir: str | Path,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    device: str = "auto",
    error_max: float = 0.25,
    recursive: bool = True,
    progress: ProgressFn = no_progress,
) -> ReconstructionResult:
    """Reconstruct every image in ``inputs`` with an autoencoder checkpoint and write the views."""

    dev = resolve_device(device)
    net, config = load_for_inference(model, dev, kind="autoencoder")
    entries = [e for e in collect_inputs(inputs, recursive) if e[1] != "skipped"]
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    namer = UniqueNames(out, ".recon.png")
    rows = [Reconstruction(p, status, reason=reason) for p, status, reason in entries]
    todo = [i for i, e in enumerate(entries) if e[1] == "ok"]
    strips: list[tuple[str, np.ndarray]] = []
    size, mode = int(config["image_size"]), config.get("resize_mode", "stretch")
    done = 0
    for batch in iter_batches([entries[i][0] for i in todo], size, mode, batch_size, num_workers):
        for j, _, reason in batch.errors:
            rows[todo[j]] = Reconstruction(entries[todo[j]][0], "error", reason=reason)
        if batch.indices:
            with torch.inference_mode():
                recon = net(batch.images.to(dev)).float().cpu()
            x = batch.images
            mse = ((recon - x) ** 2).flatten(1).mean(1).numpy()
            mae = (recon - x).abs().flatten(1).mean(1).numpy()
            for r, (j, path) in enumerate(zip(batch.indices, batch.paths)):
                img, rec = x[r, 0].numpy(), recon[r, 0].numpy()
                strip = triptych(img, rec, error_max)
                target = namer(path)
                atomic_write_bytes(target, _png(strip))
                psnr = 10 * math.log10(1.0 / mse[r]) if mse[r] > 0 else math.inf
                rows[todo[j]] = Reconstruction(path, "ok", float(mse[r]), float(mae[r]), psnr, str(target))
                if len(strips) < OVERVIEW_ROWS:
                    strips.append((f"{Path(path).name}  MSE {mse[r]:.5f}", strip))
        done += len(batch)
        progress("reconstruct", done, len(todo))
    overview = _overview(out / "reconstructions.png", strips, error_max) if strips else None
    table = _write_csv(out / "reconstruction.csv", rows)
    return ReconstructionResult(rows, out, table, overview)


def _write_csv(path: Path, rows: list[Reconstruction]) -> Path:
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
    return path
