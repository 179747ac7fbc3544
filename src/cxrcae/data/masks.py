"""Segmentation masks: a mask file read as 0/1, brought to the model's square input as its image is, and back.

- **Reading** (``read_mask``): any file cxrcae decodes (PNG, TIFF, BMP, JPEG, DICOM). A pixel belongs to the
  structure when it is at least half the file's largest value, so 0/255 and 0/1 masks both work (colour
  masks: the brightest channel); an all-zero file is an empty mask.
- **Resizing** (``resize_mask``): the same geometry as the image (``cxrcae.io.resize_xray``: ``stretch``, or
  ``pad`` into the same letterbox), by area averaging then a 0.5 threshold: a model pixel is in the mask
  when at least half of the area it covers was. Never interpolated into soft labels; upscaling is nearest.
- **Checking** (``check_masks``): every structure has a mask file for every image, and each mask has its
  image's aspect ratio (a mask at another resolution is fine: it is resized; another shape is not). Both are
  one-line ``DataError``s naming the file and column, raised before any training step.
- ``restore_mask`` maps a model-size mask back onto an original image of any size (predict's mask files).

Torch-free, like the rest of ``cxrcae.data`` outside ``dataset``/``stream``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxrcae.data.records import Record, is_file_value
from cxrcae.errors import CxrcaeError, DataError, ImageLoadError
from cxrcae.io import RESIZE_MODES, load_xray
from cxrcae.io.decode import decode_native
from cxrcae.io.resize import letterbox_box

ASPECT_TOLERANCE = 0.02
"""Relative difference of height/width ratios still read as "the same aspect ratio" (rounding of a mask
saved at half or a quarter of the image's resolution)."""
_ORIENTATION = 0x0112
_SIDEWAYS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def mask_path(record: Record, column: str) -> Path | None:
    """The mask file of ``record`` for ``column`` (absolute: relative paths were resolved against the
    manifest's folder when it was read), or None when the column is empty or absent."""
    value = record.value(column)
    return Path(value) if value else None


def mask_columns(records: Sequence[Record]) -> list[str]:
    """The columns whose value is an image file on every record (the ``masks/<structure>/`` folders of a
    folder layout, or a manifest's mask-path columns), in first-seen order."""
    columns: dict[str, None] = {}
    for r in records:
        columns.update(dict.fromkeys(r.extra))
    return [c for c in columns if records and all(is_file_value(r.extra.get(c, "")) for r in records)]


def read_mask(path: str | Path) -> np.ndarray:
    """The mask file at ``path`` as an HxW bool array (see the module docstring for the threshold).
    Raises ``ImageLoadError`` (one line) when it is not a readable image."""
    native, dicom = decode_native(path)
    pixels = native.pixels if native is not None else np.asarray(dicom[1])
    if pixels.ndim == 3:
        pixels = pixels.max(axis=-1)
    if pixels.ndim != 2 or 0 in pixels.shape:
        raise ImageLoadError(Path(path), f"a mask must be a 2-D image, got shape {tuple(pixels.shape)}")
    top = float(pixels.max())
    if not top > 0:
        return np.zeros(pixels.shape, dtype=bool)
    return pixels >= top / 2


def _area_resize(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask.astype(bool, copy=True)
    pil = Image.fromarray(mask.astype(np.float32), mode="F")
    return np.asarray(pil.resize((width, height), Image.Resampling.BOX), dtype=np.float32) >= 0.5


def resize_mask(mask: np.ndarray, size: int, mode: str = "stretch") -> np.ndarray:
    """An HxW 0/1 mask as the size x size bool mask aligned with ``resize_xray(image, size, mode)``."""
    if mode not in RESIZE_MODES:
        raise CxrcaeError(f"unknown resize mode {mode!r}; choose one of: {', '.join(RESIZE_MODES)}")
    if mask.ndim != 2 or 0 in mask.shape:
        raise CxrcaeError(f"resize_mask expects a non-empty HxW mask, got shape {tuple(mask.shape)}")
    size = int(size)
    if mode == "stretch":
        return _area_resize(mask, size, size)
    top, left, new_h, new_w = letterbox_box(*mask.shape, size)
    out = np.zeros((size, size), dtype=bool)
    out[top : top + new_h, left : left + new_w] = _area_resize(mask, new_w, new_h)
    return out


def restore_mask(mask: np.ndarray, shape: tuple[int, int], mode: str = "stretch") -> np.ndarray:
    """A model-size square mask mapped back onto an image of ``shape`` (H, W): the inverse geometry of
    ``resize_mask`` (the letterbox border dropped under ``pad``)."""
    if mode not in RESIZE_MODES:
        raise CxrcaeError(f"unknown resize mode {mode!r}; choose one of: {', '.join(RESIZE_MODES)}")
    height, width = int(shape[0]), int(shape[1])
    if mode == "pad":
        top, left, new_h, new_w = letterbox_box(height, width, mask.shape[0])
        mask = mask[top : top + new_h, left : left + new_w]
    return _area_resize(mask, width, height)


def stored_shape(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file as ``load_xray`` returns it (EXIF rotation applied), from its header
    where Pillow can read one, else by decoding it (DICOM)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_ORIENTATION, 1) in _SIDEWAYS:
                width, height = height, width
            return height, width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        shape = load_xray(path, max_pixels=None).shape
        return int(shape[0]), int(shape[1])


def same_aspect(a: tuple[int, int], b: tuple[int, int], tolerance: float = ASPECT_TOLERANCE) -> bool:
    """Whether two (height, width) sizes have the same aspect ratio, up to ``tolerance`` (relative)."""
    ra, rb = a[0] / a[1], b[0] / b[1]
    return abs(ra - rb) <= tolerance * max(ra, rb)


def _size_text(shape: tuple[int, int]) -> str:
    return f"{shape[1]}x{shape[0]}"


def check_masks(records: Sequence[Record], structures: Sequence[str], where: str | Path) -> None:
    """Every record has an existing mask file per structure with its image's aspect ratio; else a one-line
    ``DataError`` naming the file and column. An image that cannot be read is left to the loader (it is
    skipped like any unreadable training image); a mask that cannot be read is an error."""
    for r in records:
        image_shape: tuple[int, int] | None = None
        for column in structures:
            path = mask_path(r, column)
            if path is None:
                raise DataError(f"{where}: {r.path}: no mask file in column {column!r}")
            if not path.is_file():
                raise DataError(f"{path}: mask file not found (column {column!r}, image {r.path})")
            try:
                shape = stored_shape(path)
            except ImageLoadError as exc:
                raise DataError(f"{path}: unreadable mask (column {column!r}): {exc.reason}") from None
            if image_shape is None:
                try:
                    image_shape = stored_shape(r.path)
                except ImageLoadError:
                    break
            if not same_aspect(shape, image_shape):
                raise DataError(
                    f"{path}: mask is {_size_text(shape)} but its image {r.path} is "
                    f"{_size_text(image_shape)} (column {column!r}): a mask needs its image's aspect ratio"
                )


def load_masks(record: Record, structures: Sequence[str], size: int, mode: str = "stretch") -> np.ndarray:
    """(K, size, size) uint8 0/1: the record's mask per structure at the model's input size."""
    out = np.zeros((len(structures), int(size), int(size)), dtype=np.uint8)
    for k, column in enumerate(structures):
        path = mask_path(record, column)
        if path is None:
            raise DataError(f"{record.path}: no mask file in column {column!r}")
        if not path.is_file():
            raise DataError(f"{path}: mask file not found (column {column!r}, image {record.path})")
        try:
            out[k] = resize_mask(read_mask(path), size, mode)
        except ImageLoadError as exc:
            raise DataError(f"{path}: unreadable mask (column {column!r}): {exc.reason}") from None
    return out
