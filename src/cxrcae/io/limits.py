"""The decompression-bomb guard: one pixel limit for every decoder, overridable per call or by env var."""

from __future__ import annotations

import os
from pathlib import Path

from cxrcae.errors import CxrcaeError, ImageLoadError

ENV_MAX_PIXELS = "CXRCAE_MAX_PIXELS"


class _DefaultLimit(int):
    """An int that knows it is the default: CXRCAE_MAX_PIXELS may replace it, an explicit value may not."""

    def __repr__(self) -> str:
        return f"DEFAULT_MAX_PIXELS({int(self)})"


#: 100 megapixels: ~4x the largest chest radiograph detector, far below what exhausts memory as float32.
DEFAULT_MAX_PIXELS: int = _DefaultLimit(100_000_000)


def resolve_max_pixels(max_pixels: int | None) -> int | None:
    """The limit in force: an explicit argument, else $CXRCAE_MAX_PIXELS ("none" = no limit), else default."""
    if not isinstance(max_pixels, _DefaultLimit):
        return max_pixels
    raw = os.environ.get(ENV_MAX_PIXELS, "").strip()
    if not raw:
        return int(max_pixels)
    if raw.lower() in {"none", "0", "off"}:
        return None
    try:
        value = int(float(raw))
    except ValueError:
        value = -1
    if value <= 0:
        raise CxrcaeError(f"{ENV_MAX_PIXELS}={raw!r} must be a positive pixel count or 'none'")
    return value


def check_pixels(path: str | Path, width: int, height: int, frames: int, limit: int | None) -> None:
    """Refuse an image before decoding it when its declared size exceeds the limit."""
    total = int(width) * int(height) * max(int(frames), 1)
    if limit is not None and total > limit:
        raise ImageLoadError(
            path,
            f"image too large: {width}x{height}"
            + (f"x{frames} frames" if frames > 1 else "")
            + f" = {total:,} pixels exceeds the limit of {limit:,} "
            f"(possible decompression bomb; raise it with max_pixels or {ENV_MAX_PIXELS})",
        )
