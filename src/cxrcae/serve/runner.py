"""The model behind the server: loaded once, guarded by a bounded queue, run on its own threads.

``ModelRunner`` resolves the classifier once into a ``LoadedModel`` (a folder, a Hub id, the bundled default,
an in-memory model; a task without the ``serve`` option is refused in one line), with its OOD screen, and
answers one upload at a time per worker thread, each thread with its own copy of the network (Grad-CAM hooks
a layer, so two explanations must not share one). Admission is a counter, not an unbounded queue: at most
``queue_size`` requests hold a slot (reading their body, waiting for a worker, or running); one more is
refused at once with ``QueueFull``, which the app turns into 503 + Retry-After, so a burst of uploads waits
in bounded memory instead of piling up.

Each prediction goes through ``cxrcae.infer.prediction.iter_predictions`` on a private copy of the upload,
with the same loaded model (the worker's copy of its network swapped in), so decoding (DICOM windowing, EXIF
orientation, resize mode from config.json), temperature, the screen and every field ``Prediction.to_dict()``
carries are exactly those of ``cxrcae predict``.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import math
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrcae.errors import CxrcaeError, ImageLoadError
from cxrcae.hub.resolve import LoadedModel, download_commit, in_hub_cache, parse_repo_ref
from cxrcae.infer.explain import DEFAULT_LAYER, GradCAM
from cxrcae.infer.prediction import Prediction, iter_predictions, prediction_model
from cxrcae.io import load_for_model, load_xray, resize_xray
from cxrcae.models.checkpoint import CARD_NAME
from cxrcae.runtime import precision_name, resolve_device, resolve_precision
from cxrcae.serve.render import PREVIEW_SIZE, dicom_display, overlay_png, preview_png, shrink
from cxrcae.serve.uploads import private_copy

BUNDLED_ID = "bundled:default"
DEFAULT_QUEUE = 8
# Prediction fields that name the scratch file rather than describe the image: left out of the answer
_HIDDEN = ("path", "explanation")


class QueueFull(Exception):
    """Every slot is taken; ``retry_after`` is a guess in whole seconds of when one frees up."""

    def __init__(self, retry_after: int):
        super().__init__(f"busy: try again in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class ModelInfo:
    """What ``GET /model`` and every answer say about the model."""

    id: str
    version: str
    class_names: list[str]
    image_size: int
    resize_mode: str
    can_explain: bool
    config: dict[str, Any] = field(repr=False)
    card: str | None = field(default=None, repr=False)


class ModelRunner:
    """Load once, then ``await runner.predict(data, fmt, ...)`` inside ``with runner.slot():``."""

    def __init__(
        self,
        model: Any = None,
        *,
        device: str = "auto",
        precision: str = "auto",
        workers: int = 1,
        queue_size: int = DEFAULT_QUEUE,
    ):
        if int(workers) < 1:
            raise CxrcaeError(f"workers must be at least 1, got {workers}")
        if int(queue_size) < int(workers):
            raise CxrcaeError(
                f"the queue ({queue_size}) must hold at least one request per worker ({workers})"
            )
        self.device = resolve_device(device)
        # resolved once (the bundled default filled in, a Hub id downloaded), with its screen and guard
        self.loaded = prediction_model(model, str(self.device), ood=True)
        self.loaded.task.require_option("serve", "serve")
        net, config = self.loaded.net, self.loaded.config
        self.workers = int(workers)
        self.capacity = int(queue_size)
        self.precision = precision_name(resolve_precision(precision, self.device, int(config["image_size"])))
        self.info = describe_model(model, self.loaded)
        self._nets: queue.SimpleQueue[nn.Module] = queue.SimpleQueue()
        self._nets.put(net)
        for _ in range(self.workers - 1):
            self._nets.put(copy.deepcopy(net))
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="cxrcae-serve")
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.served = 0
        self.rejected = 0
        self._seconds = 1.0  # running mean of one prediction, for Retry-After

    # ----------------------------------------------------------------------------------------- admission

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of ``capacity`` places for the whole request, or raise ``QueueFull`` at once."""
        with self._lock:
            if self.in_flight >= self.capacity:
                self.rejected += 1
                raise QueueFull(self._retry_after())
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def _retry_after(self) -> int:
        waves = math.ceil(self.in_flight / self.workers)
        return int(min(60, max(1, math.ceil(self._seconds * waves))))

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "in_flight": self.in_flight,
                "capacity": self.capacity,
                "workers": self.workers,
                "peak": self.peak,
                "served": self.served,
                "rejected": self.rejected,
            }

    # ---------------------------------------------------------------------------------------- prediction

    async def predict(self, data: bytes, fmt: str, *, explain: bool = False, preview: bool = False) -> dict:
        """The answer for one upload of sniffed format ``fmt``, computed on a worker thread."""
        job = partial(self.predict_bytes, data, fmt, explain=explain, preview=preview)
        return await asyncio.get_running_loop().run_in_executor(self._executor, job)

    def predict_bytes(self, data: bytes, fmt: str, *, explain: bool = False, preview: bool = False) -> dict:
        """Blocking form of ``predict``; raises ImageLoadError for an image the decoders refuse."""
        if explain and not self.info.can_explain:
            raise CxrcaeError(f"Grad-CAM needs the layer {DEFAULT_LAYER}, which this model does not have")
        start = time.perf_counter()
        net = self._nets.get()
        try:
            with private_copy(data, fmt) as path:
                pred = self._row(net, path)
                answer = public_row(pred)
                answer["input"] = {"format": fmt, "bytes": len(data)}
                if fmt == "DICOM":
                    answer["input"]["dicom"] = dicom_display(path)
                if explain or preview:
                    full = load_xray(path, target_size=PREVIEW_SIZE)
                    image = shrink(full, PREVIEW_SIZE)
                    answer["input"]["preview_size"] = [int(image.shape[1]), int(image.shape[0])]
                    if preview:
                        answer["preview_png"] = preview_png(image)
                    if explain and pred.top_class is not None:  # a refused file has no class to explain
                        cam = self._gradcam(net, self._model_input(path, fmt, full), pred.top_class)
                        answer["overlay_png"] = overlay_png(image, cam, self.info.resize_mode)
        finally:
            self._nets.put(net)
        seconds = time.perf_counter() - start
        with self._lock:
            self.served += 1
            self._seconds = 0.8 * self._seconds + 0.2 * seconds
        answer["model"] = {"id": self.info.id, "version": self.info.version}
        answer["seconds"] = round(seconds, 4)
        return answer

    def _row(self, net: nn.Module, path: Path) -> Prediction:
        (pred,) = iter_predictions(
            [path],
            replace(self.loaded, net=net),  # this worker's network; the screen (and guard) loaded once
            batch_size=1,
            num_workers=0,
            device=str(self.device),
            precision=self.precision,
        )  # one file named explicitly: exactly one row
        if pred.status == "error":
            raise ImageLoadError("upload", pred.reason or "unreadable image")
        return pred

    def _model_input(self, path: Path, fmt: str, full: np.ndarray) -> np.ndarray:
        """What ``load_for_model`` gives, from the decode already done where that is the same: only a JPEG
        decodes differently at the model's size (DCT scaling), every other format is resized from full."""
        size, mode = self.info.image_size, self.info.resize_mode
        if fmt == "JPEG":
            return load_for_model(path, size, mode)
        gray = resize_xray(full, size, mode)
        return np.ascontiguousarray(np.broadcast_to(gray, (3, *gray.shape)), dtype=np.float32)

    def _gradcam(self, net: nn.Module, image: np.ndarray, top_class: str) -> np.ndarray:
        """The heat map of the class the row reports (named, so a bf16 row and the fp32 map agree)."""
        x = torch.from_numpy(image)[None].to(self.device)
        target = torch.tensor([self.info.class_names.index(top_class)])
        _, cams = GradCAM(net)(x, target)
        return cams[0].cpu().numpy()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def public_row(pred: Prediction) -> dict[str, Any]:
    """``Prediction.to_dict()`` without the scratch-file fields, every other key passed through as JSON."""
    return {k: _plain(v) for k, v in pred.to_dict().items() if k not in _HIDDEN}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)) and getattr(value, "ndim", 0) == 0:
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def describe_model(model: Any, loaded: LoadedModel) -> ModelInfo:
    """Id (Hub id, ``bundled:default``, folder name or ``in-memory``) and version (Hub commit, else the
    weights' sha256), plus the card and config a client may want to read."""
    card = None
    net, config, folder = loaded.net, loaded.config, loaded.folder
    if folder is None:
        model_id, commit = "in-memory", None
    else:
        commit = download_commit(folder) if in_hub_cache(folder) else None
        if model is None or model == "":
            model_id = BUNDLED_ID
        elif commit is not None:
            model_id = parse_repo_ref(str(model))[0]
        else:
            model_id = folder.resolve().name
        card_path = folder / CARD_NAME
        card = card_path.read_text("utf-8", errors="replace") if card_path.is_file() else None
    sha = config.get("weights_sha256") or _state_sha256(net)
    return ModelInfo(
        id=model_id,
        version=(commit or sha)[:12],
        class_names=list(config["class_names"]),
        image_size=int(config["image_size"]),
        resize_mode=str(config.get("resize_mode", "stretch")),
        can_explain=DEFAULT_LAYER in dict(net.named_modules()),
        config=config,
        card=card,
    )


def _state_sha256(net: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
