"""Property tests of ``load_xray`` (hypothesis): whatever bytes it is given, it returns a finite float32 HxW
array in [0, 1] (of the image's own shape when the image is valid) or raises ``ImageLoadError`` with a
one-line reason: never another exception, never a hang.

Inputs: random bytes behind each format's signature; real X-rays in every supported format (PNG 8/16-bit,
JPEG, TIFF, BMP, DICOM uncompressed and in each compressed transfer syntax) truncated anywhere or with
random bits flipped; and valid images of random size, mode and bit depth written by Pillow and pydicom.
Examples are derandomised and few, so the suite stays fast and the same on every machine;
``CXRCAE_FUZZ_EXAMPLES=5000`` runs a deeper, random search. A watchdog ends the run with a traceback if
one example ever hangs. (This found damaged DICOMs making pydicom raise ValueError or NotImplementedError,
and the RLE decoder panic, past the old handlers; ``cxrcae.io.dicom`` now turns any failure into an
ImageLoadError.)
"""

from __future__ import annotations

import faulthandler
import io
import os
import subprocess
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage

from conftest import FIXTURE_DATA
from cxrcae.errors import ImageLoadError
from cxrcae.io import load_xray

DEEP = int(os.environ.get("CXRCAE_FUZZ_EXAMPLES", "0"))


def _settings(examples: int) -> settings:
    return settings(
        max_examples=DEEP or examples,
        derandomize=not DEEP,
        deadline=timedelta(seconds=10),  # generous: a slow example is reported, a normal one takes ms
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


MAX_PIXELS = 4_000_000  # a flipped bit can make a header claim a huge image: keep the bound small here


@pytest.fixture(autouse=True)
def _watchdog():
    """A hang inside a decoder cannot be interrupted from Python: dump every thread and exit instead."""
    faulthandler.dump_traceback_later(600, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _load(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray | None:
    """The property: an array honouring the pixel contract (of ``shape``), or a one-line ImageLoadError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom and Pillow warn about what they then refuse or repair
        try:
            out = load_xray(path, max_pixels=MAX_PIXELS)
        except ImageLoadError as exc:
            assert str(exc) and "\n" not in str(exc)
            return None
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.ndim == 2 and out.size > 0
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    if shape is not None:
        assert out.shape == shape
    return out


def _dicom_bytes(pixels: np.ndarray, *, bits: int = 16, photometric="MONOCHROME2", signed=False, rle=False):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "CR", 1, photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, int(signed)
    dtype = ("<i" if signed else "<u") + ("2" if bits > 8 else "1")
    ds.PixelData = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
    if rle:  # pydicom's own encoder: gdcm's aborts the process on 8-bit images of odd width
        ds.compress(RLELossless, encoding_plugin="pydicom")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _real_xray(size: tuple[int, int] = (48, 40)) -> Image.Image:
    first = sorted((FIXTURE_DATA / "cxr" / "images").rglob("*.jpg"))[0]
    return Image.open(first).convert("L").resize(size)


COMPRESSED_DICOM = (
    "MR_small_jp2klossless.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "JPEGLSNearLossless_16.dcm",
    "MR_small_RLE.dcm",
    "SC_jpeg_no_color_transform.dcm",
)


def _pydicom_testdata(name: str) -> str | None:
    """A small file from pydicom-data (a test dependency), or None where it is not installed."""
    try:
        from pydicom.data import get_testdata_file

        return get_testdata_file(name)
    except Exception:
        return None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[bytes, tuple[int, int]]]:
    """name -> (file bytes, decoded shape): one real chest X-ray in every supported format, small, two
    full-size originals as shipped, and pydicom's small DICOMs in each compressed transfer syntax."""
    gray = _real_xray()
    arr = np.asarray(gray)
    files: dict[str, bytes] = {}

    def pil(name: str, img: Image.Image, **kw) -> None:
        buf = io.BytesIO()
        img.save(buf, format=name.split(".")[1].upper().replace("JPG", "JPEG").replace("TIF", "TIFF"), **kw)
        files[name] = buf.getvalue()

    pil("gray8.png", gray)
    pil("gray16.png", Image.fromarray(arr.astype(np.uint16) * 257))
    pil("rgb.png", gray.convert("RGB"))
    pil("palette.png", gray.convert("P"))
    pil("gray.jpg", gray, quality=90)
    pil("progressive.jpg", gray.convert("RGB"), progressive=True)
    pil("gray.tif", gray)
    pil("lzw16.tif", Image.fromarray(arr.astype(np.uint16) * 257), compression="tiff_lzw")
    pil("gray.bmp", gray)
    files["mono2.dcm"] = _dicom_bytes((arr.astype(np.uint16) * 16), bits=12)
    files["mono1_rle.dcm"] = _dicom_bytes(arr.astype(np.uint16), bits=8, photometric="MONOCHROME1", rle=True)
    for original in sorted((FIXTURE_DATA / "originals" / "images").iterdir())[:2]:
        files[f"original{original.suffix}"] = original.read_bytes()
    for name in COMPRESSED_DICOM:  # each decoder plugin: JPEG 2000, JPEG lossless, JPEG-LS, RLE, baseline
        path = _pydicom_testdata(name)
        if path is not None:
            files[name] = Path(path).read_bytes()
    folder = tmp_path_factory.mktemp("corpus")
    result = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        result[name] = (data, load_xray(folder / name).shape)  # the intact file decodes
    return result


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


SIGNATURES = {
    "": b"",
    "png": b"\x89PNG\r\n\x1a\n",
    "jpeg": b"\xff\xd8\xff",
    "tiff-le": b"II*\x00",
    "tiff-be": b"MM\x00*",
    "bmp": b"BM",
    "dicom": b"\0" * 128 + b"DICM",
}


@_settings(150)
@given(
    signature=st.sampled_from(sorted(SIGNATURES)),
    body=st.binary(max_size=2048),
    suffix=st.sampled_from([".png", ".jpg", ".tif", ".bmp", ".dcm", ""]),
)
def test_random_bytes(scratch, signature, body, suffix):
    _load(_write(scratch, f"random{suffix}", SIGNATURES[signature] + body))


@_settings(150)
@given(data=st.data())
def test_truncated_real_files(corpus, scratch, data):
    name = data.draw(st.sampled_from(sorted(corpus)), label="file")
    blob, shape = corpus[name]
    cut = data.draw(st.integers(0, len(blob) - 1), label="cut")
    _load(_write(scratch, f"cut-{name}", blob[:cut]), shape)


@_settings(150)
@given(data=st.data())
def test_bit_flipped_real_files(corpus, scratch, data):
    name = data.draw(st.sampled_from(sorted(corpus)), label="file")
    blob = bytearray(corpus[name][0])
    header = st.integers(0, min(len(blob), 1024) * 8 - 1)  # where one flipped bit changes most
    bits = st.one_of(header, st.integers(0, len(blob) * 8 - 1))
    flips = data.draw(st.lists(bits, min_size=1, max_size=8), label="bits")
    for bit in flips:
        blob[bit // 8] ^= 1 << (bit % 8)
    _load(_write(scratch, f"flip-{name}", bytes(blob)))  # a flip may change the size the header claims


# mode -> formats that can store it (as Pillow writes them)
MODES = {
    "1": ("png", "jpeg", "tiff", "bmp"),
    "L": ("png", "jpeg", "tiff", "bmp"),
    "LA": ("png", "tiff"),
    "P": ("png", "tiff", "bmp"),
    "PA": ("tiff",),
    "RGB": ("png", "jpeg", "tiff", "bmp"),
    "RGBA": ("png", "tiff", "bmp"),
    "RGBX": ("jpeg", "tiff"),
    "CMYK": ("jpeg", "tiff"),
    "YCbCr": ("jpeg", "tiff"),
    "I;16": ("png", "tiff"),
    "I;16B": ("png", "tiff"),
    "I": ("tiff",),
    "F": ("tiff",),
}


@st.composite
def valid_images(draw):
    mode = draw(st.sampled_from(sorted(MODES)))
    fmt = draw(st.sampled_from(MODES[mode]))
    w, h = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode in ("I;16", "I;16B", "I"):
        top = draw(st.sampled_from([1, 255, 4095, 65535]))  # 1- to 16-bit content
        img = Image.fromarray(rng.integers(0, top + 1, (h, w), dtype=np.uint16)).convert(mode)
    elif mode == "F":
        img = Image.fromarray(
            rng.normal(0, draw(st.sampled_from([1e-3, 1.0, 1e6])), (h, w)).astype(np.float32)
        )
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        arr = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
        img = Image.fromarray(arr[..., 0] if bands == 1 else arr, "L" if bands == 1 else None)
        img = img.convert(mode) if img.mode != mode else img
    return img, fmt, (h, w)


@_settings(120)
@given(image=valid_images())
def test_random_valid_raster_images(scratch, image):
    img, fmt, shape = image
    path = scratch / f"valid.{fmt}"
    img.save(path, format=fmt.upper())
    assert _load(path, shape) is not None  # a valid image always loads


@_settings(60)
@given(
    rows=st.integers(1, 48),
    cols=st.integers(1, 48),
    bits=st.integers(1, 16),
    signed=st.booleans(),
    photometric=st.sampled_from(["MONOCHROME1", "MONOCHROME2"]),
    rle=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_valid_dicom_images(scratch, rows, cols, bits, signed, photometric, rle, seed):
    rng = np.random.default_rng(seed)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    pixels = rng.integers(lo, hi + 1, (rows, cols))
    data = _dicom_bytes(pixels, bits=bits, photometric=photometric, signed=signed, rle=rle)
    assert _load(_write(scratch, "valid.dcm", data), (rows, cols)) is not None


def _patched(name: str, old: bytes, new: bytes) -> bytes:
    path = _pydicom_testdata(name)
    if path is None:
        pytest.skip(f"pydicom-data's {name} is not installed")
    blob = Path(path).read_bytes()
    assert old in blob
    return blob.replace(old, new, 1)


def _flipped(name: str, byte: int, bit: int) -> bytes:
    blob = bytearray(_patched(name, b"", b""))
    blob[byte] ^= 1 << bit
    return bytes(blob)


FOUND = {
    # what fuzzing found: each raised something other than ImageLoadError before cxrcae.io.dicom caught it
    "transfer syntax UID that is no transfer syntax (ValueError)": lambda: _patched(
        "MR_small_RLE.dcm", b"1.2.840.10008.1.2.5", b"1.2.840.10008.1.9.5"
    ),
    "unknown VR in the file meta (NotImplementedError)": lambda: _patched(
        "MR_small_RLE.dcm", b"\x02\x00\x10\x00UI", b"\x02\x00\x10\x00EI"
    ),
    "RLE segment offset past the data (struct.error)": lambda: _flipped("MR_small_RLE.dcm", 1521, 5),
    "RLE run past the frame (a Rust panic, a BaseException)": lambda: _flipped("MR_small_RLE.dcm", 1544, 0),
}


@pytest.mark.parametrize("damage", list(FOUND))
def test_damaged_dicoms_found_by_fuzzing(scratch, damage):
    assert _load(_write(scratch, "found.dcm", FOUND[damage]())) is None


# single bit flips that made gdcm abort the whole process (an uncaught C++ exception) before decoding moved
# to a child process (cxrcae.io.isolated): JPEG-LS, JPEG baseline and JPEG lossless
GDCM_CRASHES = (
    ("JPEGLSNearLossless_16.dcm", 586, 0),
    ("SC_jpeg_no_color_transform.dcm", 826, 0),
    ("SC_rgb_jpeg_gdcm.dcm", 1338, 0),
)
_LOAD_EACH = """
import sys
from cxrcae.errors import ImageLoadError
from cxrcae.io import load_xray
for path in sys.argv[1:]:
    try:
        load_xray(path)
        print("loaded")
    except ImageLoadError as exc:
        print("refused", exc)
"""


def test_decoder_crashes_cost_one_file(scratch):
    """Checked in a subprocess, so that a regression fails this test instead of aborting the test run."""
    paths = [_write(scratch, f"crash-{name}", _flipped(name, byte, bit)) for name, byte, bit in GDCM_CRASHES]
    cmd = [sys.executable, "-c", _LOAD_EACH, *map(str, paths)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [ln for ln in done.stdout.splitlines() if ln.startswith(("loaded", "refused"))]
    assert len(answers) == len(paths) and all(a.startswith("refused") for a in answers), done.stdout
