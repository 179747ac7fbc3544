"""DICOM to the pixel contract: modality LUT, VOI LUT or window, MONOCHROME1 inverted so bone is bright.

Intensity mapping, in order:
1. stored values (pydicom masks them to BitsStored; compressed syntaxes decode via pylibjpeg/gdcm);
2. Modality LUT or RescaleSlope/Intercept (``apply_modality_lut``);
3. if the file has a VOI LUT or a window (first one when several), ``apply_voi_lut`` and the VOI's own
   output range defines black and white (values outside the window saturate);
   otherwise min-max over the valid pixels (Pixel Padding Value pixels excluded, then set to black);
4. MONOCHROME1 is inverted (1 - x) so the result always reads as MONOCHROME2.

``header_facts`` keeps what the out-of-distribution guard needs from the header (modality, body part, view)
and nothing else: no tag that could identify a patient leaves this module.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder, pixel_array

from cxrcae.errors import ImageLoadError
from cxrcae.io.isolated import decode_apart
from cxrcae.io.limits import check_pixels
from cxrcae.io.native import LUMA, minmax


def _corrupt(path: Path | str, exc: BaseException) -> ImageLoadError:
    """Whatever a damaged file makes pydicom or a decoder plugin raise (a ValueError deep in a header, a
    panic inside a Rust decoder), as one ImageLoadError line; found by fuzzing (tests/test_fuzz_io.py)."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        raise exc
    if isinstance(exc, ImageLoadError):
        return exc
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    detail = lines[-1] if len(lines[-1]) <= 200 else lines[-1][:197] + "..."
    return ImageLoadError(path, f"corrupt DICOM file ({type(exc).__name__}: {detail})")


def read_dicom(path: Path, *, max_pixels: int | None):
    """Header and first-frame stored pixels; refuses oversized or truncated images before decoding.

    Any failure is an ImageLoadError, whatever raised it (``_corrupt``)."""
    try:
        return _read_dicom(path, max_pixels=max_pixels)
    except BaseException as exc:  # a Rust decoder panics with a BaseException
        raise _corrupt(path, exc) from None


def _read_dicom(path: Path, *, max_pixels: int | None):
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageLoadError(path, f"unreadable DICOM header ({exc})") from None
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        if "TransferSyntaxUID" not in ds.get("file_meta", {}):
            raise ImageLoadError(path, "truncated image (DICOM header cut short)")
        raise ImageLoadError(path, "DICOM file has no image (no Rows/Columns)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    check_pixels(path, int(cols), int(rows), 1, max_pixels)
    if "PixelData" not in ds:
        raise ImageLoadError(path, "DICOM file has no pixel data")
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        expected = int(rows) * int(cols) * frames * spp * int(ds.get("BitsAllocated", 16)) // 8
        got = len(ds.PixelData)
        if got < expected:
            raise ImageLoadError(path, f"truncated image (pixel data has {got} of {expected} bytes)")
    if frames > 1:
        warnings.warn(f"{path}: multi-frame DICOM ({frames} frames); using the first frame", stacklevel=4)
    index = 0 if frames > 1 else None
    try:
        if _may_crash(ds):  # gdcm aborts on damaged data: decode in a child process (cxrcae.io.isolated)
            arr = decode_apart(lambda: pixel_array(ds, index=index))
        else:
            arr = pixel_array(ds, index=index)
    except NotImplementedError as exc:
        raise ImageLoadError(path, f"unsupported DICOM transfer syntax ({exc})") from None
    except (AttributeError, KeyError, EOFError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ImageLoadError(path, _decode_failure(ds, exc)) from None
    if arr.ndim == 3 and frames > 1 and arr.shape[0] == frames:  # a decoder that ignored index
        arr = arr[0]
    return ds, np.ascontiguousarray(arr)


def _may_crash(ds) -> bool:
    """Whether pydicom may hand this file's pixel data to gdcm, which can abort the process."""
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_compressed:
        return False
    try:
        return "gdcm" in get_decoder(syntax).available_plugins
    except NotImplementedError:  # no decoder at all: pydicom says so when asked to decode
        return False


def _decode_failure(ds, exc: BaseException) -> str:
    """One line from a decoder failure; pydicom lists each plugin's complaint on its own line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [repr(exc)]
    detail = "; ".join(lines[1:] if len(lines) > 1 else lines)
    detail = detail if len(detail) <= 300 else detail[:297] + "..."
    low = detail.lower()
    syntax = getattr(ds.file_meta.TransferSyntaxUID, "name", "unknown transfer syntax")
    if "not support" in low or "no pixel data handler" in low or "missing required" in low:
        return f"unsupported DICOM compression {syntax} ({detail})"
    if "truncat" in low or "end of" in low or "insufficient" in low:
        return f"truncated image ({detail})"
    return f"corrupt DICOM pixel data ({syntax}: {detail})"


def _has_voi_lut(ds) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and "LUTData" in seq[0]


def _has_window(ds) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def dicom_to_unit(ds, raw: np.ndarray) -> np.ndarray:
    """Map stored pixels to float32 [0, 1] bone-bright, as described in the module docstring; a header
    whose LUT or window values are damaged is an ImageLoadError."""
    try:
        return _dicom_to_unit(ds, raw)
    except BaseException as exc:
        raise _corrupt(getattr(ds, "filename", None) or "DICOM file", exc) from None


def _dicom_to_unit(ds, raw: np.ndarray) -> np.ndarray:

    if raw.ndim == 3:  # RGB (pydicom already converted YBR): luminance on the nominal BitsStored scale
        bits = int(ds.get("BitsStored", 8) or 8)
        unit = (raw.astype(np.float32) @ LUMA) / np.float32(2**bits - 1)
        return np.ascontiguousarray(np.clip(unit, 0.0, 1.0), dtype=np.float32)

    padding = _padding_mask(ds, raw)
    values = apply_modality_lut(raw, ds).astype(np.float64, copy=False)
    if _has_voi_lut(ds):
        # A VOI LUT is indexed by integer modality values.
        out = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0, prefer_lut=True).astype(np.float64)
        lo, hi = _lut_range(ds)
        unit = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    elif _has_window(ds):
        out = apply_voi_lut(values, ds, index=0, prefer_lut=False).astype(np.float64)
        # Probing far below/above the window yields exactly the output range it maps to.
        lo, hi = apply_voi_lut(np.array([-1e300, 1e300]), ds, index=0, prefer_lut=False).tolist()
        unit = (out - lo) / (hi - lo) if hi != lo else np.zeros_like(out)
    elif padding is not None and padding.any() and not padding.all():
        valid = values[~padding]
        lo, hi = float(valid.min()), float(valid.max())
        unit = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    else:
        unit = minmax(values)
    unit = np.clip(unit.astype(np.float32), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        unit = 1.0 - unit
    if padding is not None:
        unit[padding] = 0.0
    return np.ascontiguousarray(unit, dtype=np.float32)


def _padding_mask(ds, raw: np.ndarray) -> np.ndarray | None:
    """Pixels marked as padding (outside the imaged area) by Pixel Padding Value [and Range Limit]."""
    pad = ds.get("PixelPaddingValue")
    if pad is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit", pad)
    lo, hi = sorted((int(pad), int(limit)))
    return (raw >= lo) & (raw <= hi)


def _lut_range(ds) -> tuple[float, float]:
    """Output range of the first VOI LUT: its smallest and largest entries."""

    item = ds.VOILUTSequence[0]
    n_entries, first, _bits = (int(v) for v in item.LUTDescriptor)
    n_entries = n_entries or 65536
    probe = np.arange(first, first + n_entries, dtype=np.int64)
    table = apply_voi_lut(probe, ds, index=0, prefer_lut=True).astype(np.float64)
    return float(table.min()), float(table.max())


# The only header tags that leave this module. None of them identifies a patient (the DICOM de-identification
# profile, PS3.15 E.1-1, keeps them); free-text descriptions, names, dates and UIDs are never read here.
HEADER_FACTS = {
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "view_position": "ViewPosition",
}


def header_facts(ds) -> dict[str, str]:
    """Modality, body part and view of a DICOM file, upper-case and stripped ("" where absent).

    ``body_part`` falls back to the coded Anatomic Region and ``view`` is the coded View (e.g. "LATERAL"),
    both from their code meanings: coded values, never free text.
    """
    facts = {key: _tag_text(ds, tag) for key, tag in HEADER_FACTS.items()}
    facts["body_part"] = facts["body_part"] or _code_meaning(ds, "AnatomicRegionSequence")
    facts["view"] = _code_meaning(ds, "ViewCodeSequence")
    return facts


def _tag_text(ds, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except (ValueError, TypeError, KeyError):  # a malformed element must not make the image unreadable
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return " ".join(str(value).split()).upper()


def _code_meaning(ds, keyword: str) -> str:
    try:
        seq = ds.get(keyword)
        return _tag_text(seq[0], "CodeMeaning") if seq else ""
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return ""
