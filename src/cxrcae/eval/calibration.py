"""Temperature scaling (Guo et al. 2017): one scalar T that divides the logits, fitted on validation data.

It never changes which class wins, only how confident the model claims to be, so accuracy and AUC are
untouched while the expected calibration error and NLL usually drop. The fitted T is stored in the model's
``config.json`` as ``"temperature"`` (with how it was fitted under ``"calibration"``); prediction and
evaluation divide logits by it whenever it is present.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from cxrcae._atomic import atomic_write_text
from cxrcae.data import dataset_fingerprint, load_records
from cxrcae.data.records import check_labels
from cxrcae.errors import CheckpointError, CxrcaeError, DataError
from cxrcae.hub.resolve import LoadedModel, in_hub_cache
from cxrcae.infer.batches import answering_model, collect_outputs
from cxrcae.metrics import expected_calibration_error, softmax
from cxrcae.models.checkpoint import CONFIG_NAME, read_config
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import resolve_device, resolve_precision

MIN_T, MAX_T = 0.05, 20.0


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / T)``."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), np.asarray(labels)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] minimising validation NLL (convex in log T: a bounded 1-D search)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) < 2:
        raise CxrcaeError("temperature scaling needs at least 2 labelled validation images")
    if logits.ndim != 2 or len(labels) != len(logits):
        raise CxrcaeError(f"expected (n, classes) logits and n labels, got {logits.shape} and {len(labels)}")
    fit = minimize_scalar(
        lambda log_t: nll(logits, labels, np.exp(log_t)),
        bounds=(np.log(MIN_T), np.log(MAX_T)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(fit.x))


def store_temperature(model_dir: str | Path, temperature: float, info: dict[str, Any]) -> Path:
    """Write ``temperature`` (+ ``calibration`` provenance) into a local checkpoint's config.json, atomically.

    The weights are untouched, so ``weights_sha256`` stays valid.
    """

    folder = Path(model_dir).expanduser()
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{model_dir}: temperature can only be stored in a local checkpoint folder; download it first "
            "(e.g. `huggingface-cli download REPO --local-dir DIR`) and calibrate DIR"
        )
    config = read_config(folder)
    config["temperature"] = float(temperature)
    config["calibration"] = {"method": "temperature_scaling", **info}
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return folder / CONFIG_NAME


def fit_and_store(
    loaded: LoadedModel,
    records: Sequence[Any],
    data: str | Path,
    device: Any,
    dtype: Any,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: ProgressFn = no_progress,
) -> dict[str, Any]:
    """Fit T on the ``val`` rows of ``records``, store it in the model folder's config.json, return the fit.

    Temperature scaling divides a classifier's logits: a model whose task has no ``calibrate`` option is
    refused in one line."""
    loaded.task.require_option("calibrate", "temperature scaling (calibrate)")
    folder, config = loaded.folder, loaded.config
    if folder is None or in_hub_cache(folder):
        raise CheckpointError(
            "calibration stores the temperature in config.json, which needs a local checkpoint folder; "
            "download the model to a folder first (e.g. `hf download REPO --local-dir DIR`)"
        )
    names = list(config["class_names"])
    val = [r for r in records if r.split == "val"]
    if not val:
        raise DataError(
            f"{data}: calibration needs a splits CSV with 'val' rows (make one with `cxrcae split`)"
        )
    val, _ = check_labels(val, names, data)
    logits, ok, errors = collect_outputs(
        loaded.net,
        config,
        [str(r.path) for r in val],
        device,
        dtype,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        task="calibrate val",
    )
    y = loaded.task.targets([val[i] for i in ok], config)
    t = fit_temperature(logits, y)
    info = {
        "split": "val",
        "n": len(ok),
        "n_errors": len(errors),
        "nll_before": nll(logits, y),
        "nll_after": nll(logits, y, t),
        "ece_before": expected_calibration_error(y, softmax(logits)),
        "ece_after": expected_calibration_error(y, softmax(logits, t)),
        "data_fingerprint": dataset_fingerprint(val),
    }
    store_temperature(folder, t, info)
    return {"temperature": t, **info, "config": str(Path(folder) / "config.json")}


def calibrate(
    model_dir: str | Path,
    data: str | Path,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "auto",
    precision: str = "fp32",
    progress: ProgressFn = no_progress,
) -> dict[str, Any]:
    """Fit a temperature on the val split of a splits CSV and store it in ``model_dir``'s config.json."""

    dev = resolve_device(device)
    loaded = answering_model(model_dir, dev)
    loaded.task.require_option("calibrate", "calibrate")
    records = load_records(data, labeled=True)
    return fit_and_store(
        loaded,
        records,
        data,
        dev,
        resolve_precision(precision, dev),
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
    )
