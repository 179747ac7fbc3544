"""DICOM decoding: real CR chest images from pydicom-data and small generated files for each LUT case."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

from cxrcae.errors import ImageLoadError
from cxrcae.io import find_images, load_xray, pixel_hash


def _testdata(name: str):
    try:
        from pydicom.data import get_testdata_file

        path = get_testdata_file(name)
    except Exception as exc:  # pydicom-data missing or offline
        pytest.skip(f"pydicom test file {name} unavailable ({exc})")
    if path is None:
        pytest.skip(f"pydicom test file {name} unavailable (install pydicom-data)")
    return path


def make_dicom(path, pixels: np.ndarray, *, photometric="MONOCHROME2", bits_stored=12, **tags):
    """Write a minimal valid Secondary Capture DICOM holding ``pixels`` (uint16, HxW or FxHxW)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.fixture
def ramp() -> np.ndarray:
    """Left dark, right bright, rows differ: orientation and range are both visible."""
    x = np.linspace(100, 4000, 40)
    return (x[None, :] + np.arange(30)[:, None]).astype(np.uint16)


def test_monochrome2_minmax(tmp_path, ramp):
    make_dicom(tmp_path / "a.dcm", ramp)
    out = load_xray(tmp_path / "a.dcm")
    assert out.dtype == np.float32 and out.shape == ramp.shape
    expected = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_monochrome1_is_inverted(tmp_path, ramp):
    make_dicom(tmp_path / "m2.dcm", ramp)
    make_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1")
    m1, m2 = load_xray(tmp_path / "m1.dcm"), load_xray(tmp_path / "m2.dcm")
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m1[:, 0].mean() > 0.9 and m1[:, -1].mean() < 0.1


def test_rescale_then_window(tmp_path, ramp):
    # Slope 2, intercept -1000: window centre 3000 width 2000 selects stored values 1500..2500.
    make_dicom(
        tmp_path / "w.dcm",
        ramp,
        RescaleSlope="2",
        RescaleIntercept="-1000",
        WindowCenter="3000",
        WindowWidth="2000",
    )
    out = load_xray(tmp_path / "w.dcm")
    hu = ramp.astype(float) * 2 - 1000
    assert np.all(out[hu <= 2000] == 0.0) and np.all(out[hu >= 4000] == 1.0)
    mid = (hu > 2100) & (hu < 3900)
    np.testing.assert_allclose(out[mid], (hu[mid] - 2000) / 2000, atol=2e-3)


def test_window_with_monochrome1(tmp_path, ramp):
    make_dicom(tmp_path / "w1.dcm", ramp, photometric="MONOCHROME1", WindowCenter="2000", WindowWidth="1000")
    make_dicom(tmp_path / "w2.dcm", ramp, WindowCenter="2000", WindowWidth="1000")
    np.testing.assert_allclose(load_xray(tmp_path / "w1.dcm"), 1 - load_xray(tmp_path / "w2.dcm"), atol=1e-6)


def test_rescale_only_changes_nothing_after_minmax(tmp_path, ramp):
    make_dicom(tmp_path / "a.dcm", ramp)
    make_dicom(tmp_path / "r.dcm", ramp, RescaleSlope="0.5", RescaleIntercept="-1024")
    np.testing.assert_allclose(load_xray(tmp_path / "r.dcm"), load_xray(tmp_path / "a.dcm"), atol=1e-6)


def test_padding_excluded_from_range(tmp_path, ramp):
    padded = ramp.copy()
    padded[:, :5] = 0
    make_dicom(tmp_path / "p.dcm", padded, photometric="MONOCHROME1", PixelPaddingValue=0)
    out = load_xray(tmp_path / "p.dcm")
    assert np.all(out[:, :5] == 0.0)  # padding stays black even after the MONOCHROME1 inversion
    assert out[:, 5:].max() == pytest.approx(1.0) and out[:, 5:].min() == pytest.approx(0.0)


def test_rle_compressed_matches_uncompressed(tmp_path, ramp):
    ds = make_dicom(tmp_path / "u.dcm", ramp)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "rle.dcm").file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(load_xray(tmp_path / "rle.dcm"), load_xray(tmp_path / "u.dcm"))
    assert pixel_hash(tmp_path / "rle.dcm") == pixel_hash(tmp_path / "u.dcm")


def test_multiframe_uses_first_frame_and_warns(tmp_path, ramp):
    frames = np.stack([ramp, ramp[::-1], ramp[:, ::-1]])
    make_dicom(tmp_path / "mf.dcm", frames)
    make_dicom(tmp_path / "f0.dcm", ramp)
    with pytest.warns(UserWarning, match="multi-frame"):
        out = load_xray(tmp_path / "mf.dcm")
    np.testing.assert_array_equal(out, load_xray(tmp_path / "f0.dcm"))


def test_sniffed_by_magic_not_name(tmp_path, ramp):
    (tmp_path / "scans").mkdir()
    make_dicom(tmp_path / "scans" / "IM0001", ramp)
    make_dicom(tmp_path / "scans" / "disguised.png", ramp)
    (tmp_path / "scans" / "notes.txt").write_text("not an image")
    make_dicom(tmp_path / "ref.dcm", ramp)
    ref = load_xray(tmp_path / "ref.dcm")
    np.testing.assert_array_equal(load_xray(tmp_path / "scans" / "IM0001"), ref)
    np.testing.assert_array_equal(load_xray(tmp_path / "scans" / "disguised.png"), ref)
    files, skipped = find_images([tmp_path / "scans"])
    assert [f.name for f in files] == ["IM0001", "disguised.png"]
    assert [(p.name, r) for p, r in skipped] == [("notes.txt", "not an image file (.txt)")]


def test_oversized_header_refused_before_decoding(tmp_path):
    make_dicom(tmp_path / "big.dcm", np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(tmp_path / "big.dcm")
    ds.Rows = ds.Columns = 20000  # claims 400 MP but holds 16 pixels
    ds.save_as(tmp_path / "big.dcm")
    with pytest.raises(ImageLoadError, match="too large"):
        load_xray(tmp_path / "big.dcm")
    # Without a limit the header passes, and the 32 bytes of pixel data are the error.
    with pytest.raises(ImageLoadError, match="truncated image"):
        load_xray(tmp_path / "big.dcm", max_pixels=None)


def test_dicom_without_pixels_or_truncated(tmp_path, ramp):
    make_dicom(tmp_path / "a.dcm", ramp)
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(ImageLoadError, match="no pixel data"):
        load_xray(tmp_path / "nopix.dcm")
    data = (tmp_path / "a.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 500])
    (tmp_path / "head.dcm").write_bytes(data[:140])
    for name in ("cut.dcm", "head.dcm"):
        with pytest.raises(ImageLoadError, match="truncated image"):
            load_xray(tmp_path / name)


def _regions(img: np.ndarray) -> tuple[float, float]:
    """Mean of the central (spine/mediastinum) band and of both lung-field bands, middle half of the rows."""
    h, w = img.shape
    rows = img[h // 4 : 3 * h // 4]
    centre = rows[:, w // 2 - 50 : w // 2 + 50].mean()
    lungs = np.mean([rows[:, int(w * f) - 50 : int(w * f) + 50].mean() for f in (0.25, 0.75)])
    return float(centre), float(lungs)


def test_real_chest_cr_lossless_pair():
    unc, j2k = load_xray(_testdata("RG1_UNCR.dcm")), load_xray(_testdata("RG1_J2KR.dcm"))
    assert unc.shape == (1955, 1841) and unc.dtype == np.float32
    assert 0.0 <= unc.min() and unc.max() <= 1.0
    np.testing.assert_array_equal(unc, j2k)
    centre, lungs = _regions(unc)
    assert centre > lungs + 0.15, (centre, lungs)  # MONOCHROME1 inverted: bone bright
    assert pixel_hash(_testdata("RG1_UNCR.dcm")) == pixel_hash(_testdata("RG1_J2KR.dcm"))


def test_real_chest_cr_lossy_pair():
    unc, j2k = load_xray(_testdata("RG1_UNCI.dcm")), load_xray(_testdata("RG1_J2KI.dcm"))
    np.testing.assert_array_equal(unc, j2k)
    lossless = load_xray(_testdata("RG1_UNCR.dcm"))
    assert not np.array_equal(unc, lossless) and np.abs(unc - lossless).mean() < 0.01
    centre, lungs = _regions(unc)
    assert centre > lungs + 0.15


def test_no_warnings_for_single_frame(tmp_path, ramp):
    make_dicom(tmp_path / "a.dcm", ramp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_xray(tmp_path / "a.dcm")


def test_voi_lut_sequence_defines_range(tmp_path):
    from pydicom.sequence import Sequence

    stored = (np.linspace(0, 4095, 40)[None, :] + np.zeros((30, 1))).astype(np.uint16)
    lut = (np.sqrt(np.arange(4096) / 4095) * 200 + 20).astype(np.uint16)  # a curve, output 20..220
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", lut.tolist())
    # The LUT takes precedence over the (nonsense) window also present.
    make_dicom(
        tmp_path / "lut.dcm", stored, VOILUTSequence=Sequence([item]), WindowCenter="5", WindowWidth="2"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_xray(tmp_path / "lut.dcm")
    np.testing.assert_allclose(out, (lut[stored] - 20.0) / 200.0, atol=1e-6)


def test_colour_dicom_becomes_luminance():
    rgb = pydicom.dcmread(_testdata("SC_rgb.dcm")).pixel_array
    out = load_xray(_testdata("SC_rgb.dcm"))
    assert out.shape == rgb.shape[:2]
    np.testing.assert_allclose(out, rgb @ np.array([0.299, 0.587, 0.114]) / 255.0, atol=1e-5)
    np.testing.assert_allclose(load_xray(_testdata("SC_rgb_rle.dcm")), out, atol=1e-6)


def test_unsupported_compression_is_one_line_error():
    path = _testdata("JPEG-lossy.dcm")  # 12-bit JPEG Extended: gdcm and Pillow refuse it
    try:
        load_xray(path)
    except ImageLoadError as exc:
        assert "unsupported DICOM compression" in exc.reason and "\n" not in str(exc)
    else:
        pytest.skip("a decoder for 12-bit JPEG Extended is installed (e.g. pylibjpeg-libjpeg)")
