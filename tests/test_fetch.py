"""fetch: downloads, resume, checksums, safe extraction, cache reuse and the CLI, against a local mirror.

Fixture archives are built in memory from the real images and metadata in ../shared/data and served by a
ThreadingHTTPServer on 127.0.0.1 that the test starts (Range support, a switch to cut a connection).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
import tarfile
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from cxrcae.data import load_records
from cxrcae.errors import DataError, DownloadError
from cxrcae.fetch import SOURCES, UnsafeArchiveError, download, fetch_source, registry, safe_extract
from cxrcae.fetch import cache as fetch_cache


class Mirror:
    """Serves ``files`` (URL path -> bytes), logs requests; ``cut[path] = n`` drops the next after n bytes."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.log: list[tuple[str, str | None]] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                rng = self.headers.get("Range")
                mirror.log.append((self.path, rng))
                body = mirror.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                cut = mirror.cut.pop(self.path, None)
                self.wfile.write(body[start:cut] if cut is not None else body[start:])
                if cut is not None:
                    self.wfile.flush()
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def serve(self, name: str, data: bytes, filename: str | None = None) -> str:
        """Publish ``data`` as source ``name``'s archive (or its file ``filename``); returns its full URL."""
        path = f"/{name}/{filename or SOURCES[name].archive_name}"
        self.files[path] = data
        return self.url + path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror():
    m = Mirror()
    yield m
    m.close()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _shared_rows(shared_data: Path, source: str) -> list[dict]:
    with open(shared_data / "cxr" / "manifest.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["source"] == source]


# Labels of the findings in the shipped fixture set's synthetic Figure1/Actualmed metadata (the real metadata
# comes with real images in ../shared; the fixture set may not redistribute those sources' images).
_SYNTHETIC_LABELS = {"COVID-19": "COVID", "No finding": "NORMAL", "Pneumonia": "PNEUMONIA"}


def _metadata_rows(path: Path, encoding: str = "utf-8") -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_bytes().decode(encoding), newline="")))


def _stand_in_images(shared_data: Path, n: int) -> list[bytes]:
    """Real X-ray bytes to stand in for a source whose images the fixture set cannot ship."""
    rows = _shared_rows(shared_data, "kermany")[:n]
    return [(shared_data / "cxr" / r["path"]).read_bytes() for r in rows]


@pytest.fixture(scope="module")
def figure1_zip(shared_data) -> tuple[bytes, dict[str, str]]:
    """A GitHub-style archive of Figure1: metadata.csv plus images (name -> label). With ../shared: the real
    metadata and the shared Figure1 images; else the synthetic metadata, every other image present."""
    top = f"Figure1-COVID-chestxray-dataset-{registry._FIGURE1_COMMIT}"
    meta = shared_data / "metadata" / "figure1-metadata.csv"
    entries = {f"{top}/metadata.csv": meta.read_bytes()}
    labels = {}
    shared_rows = _shared_rows(shared_data, "figure1")
    for row in shared_rows:
        name = Path(row["path"]).name
        entries[f"{top}/images/{name}"] = (shared_data / "cxr" / row["path"]).read_bytes()
        labels[name] = row["label"]
    if not shared_rows:
        rows = _metadata_rows(meta, "cp1252")[::2]
        for row, data in zip(rows, _stand_in_images(shared_data, len(rows)), strict=True):
            name = f"{row['patientid']}.jpg"
            entries[f"{top}/images/{name}"] = data
            labels[name] = _SYNTHETIC_LABELS.get(row["finding"], "UNLABELED")
    entries[f"{top}/README.md"] = b"research purposes only\n"
    return _zip(entries), labels


@pytest.fixture(scope="module")
def actualmed_zip(shared_data) -> bytes:
    top = f"Actualmed-COVID-chestxray-dataset-{registry._ACTUALMED_COMMIT}"
    meta = shared_data / "metadata" / "actualmed-metadata.csv"
    entries = {f"{top}/metadata.csv": meta.read_bytes()}
    shared_rows = _shared_rows(shared_data, "actualmed")[:12]
    for row in shared_rows:
        # the shared copies are JPEG re-encodes of the published PNGs; keep the published name
        name = Path(row["path"]).with_suffix(".png").name
        entries[f"{top}/images/{name}"] = (shared_data / "cxr" / row["path"]).read_bytes()
    if not shared_rows:
        rows = _metadata_rows(meta)[:12]
        for row, data in zip(rows, _stand_in_images(shared_data, len(rows)), strict=True):
            entries[f"{top}/images/{row['imagename']}"] = data
    return _zip(entries)


def test_fresh_download_verifies_and_moves_into_place(mirror, tmp_path):
    data = bytes(range(256)) * 4000
    url = mirror.serve("figure1", data)
    got = download(url, tmp_path / "a.zip", sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    assert got.path.read_bytes() == data
    assert got.sha256 == hashlib.sha256(data).hexdigest() and not got.resumed
    assert not (tmp_path / "a.zip.part").exists()
    assert mirror.log == [(f"/figure1/{SOURCES['figure1'].archive_name}", None)]


def test_resume_after_cut_connection_uses_range(mirror, tmp_path):
    data = hashlib.sha256(b"x").digest() * 40_000  # 1.28 MB
    url = mirror.serve("figure1", data)
    mirror.cut[url.removeprefix(mirror.url)] = 300_000
    got = download(url, tmp_path / "a.zip", sha256=hashlib.sha256(data).hexdigest(), retries=2, backoff=0)
    assert got.path.read_bytes() == data and got.resumed
    assert [rng for _, rng in mirror.log] == [None, "bytes=300000-"]


def test_failed_download_keeps_partial_file_and_next_run_resumes(mirror, tmp_path):
    data = b"0123456789" * 50_000
    url = mirror.serve("figure1", data)
    mirror.cut[url.removeprefix(mirror.url)] = 123_456
    with pytest.raises(DownloadError, match="run the command again to resume"):
        download(url, tmp_path / "a.zip", retries=0)
    assert (tmp_path / "a.zip.part").stat().st_size == 123_456
    got = download(url, tmp_path / "a.zip", retries=0)
    assert got.resumed and got.sha256 == hashlib.sha256(data).hexdigest()
    assert mirror.log[-1][1] == "bytes=123456-"


def test_complete_partial_file_is_verified_without_downloading_again(mirror, tmp_path):
    data = b"abc" * 1000
    url = mirror.serve("figure1", data)
    (tmp_path / "a.zip.part").write_bytes(data)  # an earlier run stopped right before verifying
    got = download(url, tmp_path / "a.zip", sha256=hashlib.sha256(data).hexdigest())
    assert got.path.read_bytes() == data
    assert mirror.log == [(url.removeprefix(mirror.url), "bytes=3000-")]


def test_checksum_mismatch_rejects_file_and_caches_nothing(mirror, tmp_path):
    url = mirror.serve("figure1", b"not what the publisher hashed")
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download(url, tmp_path / "a.zip", sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_http_error_is_not_retried(mirror, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(mirror.url + "/nothing/here.zip", tmp_path / "a.zip", retries=3, backoff=0)
    assert len(mirror.log) == 1


def test_disk_space_is_checked_before_downloading(mirror, tmp_path, monkeypatch):
    import shutil

    download_module = sys.modules["cxrcae.fetch.download"]  # the module, not the function it exports

    url = mirror.serve("figure1", b"x" * 1000)
    usage = shutil.disk_usage(tmp_path)._replace(free=10)
    monkeypatch.setattr(download_module.shutil, "disk_usage", lambda _: usage)
    with pytest.raises(DownloadError, match="GB are free"):
        download(url, tmp_path / "a.zip")
    assert not (tmp_path / "a.zip").exists()


# --- safe extraction ---------------------------------------------------------------------------------


def _zip_with_symlink() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("repo/link")
        info.external_attr = (0o120777 << 16) | 0x20
        zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        member.size = len(data)
        tf.addfile(member, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _tar_member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("archive", "reason"),
    [
        (lambda: _zip({"repo/ok.txt": b"ok", "repo/../../evil.txt": b"pwned"}), r"\.\."),
        (lambda: _zip({"/tmp/evil.txt": b"pwned"}), "absolute path"),
        (lambda: _zip({"C:/evil.txt": b"pwned"}), "absolute path"),
        (lambda: _zip({"repo\\..\\..\\evil.txt": b"pwned"}), r"\.\."),
        (_zip_with_symlink, "symlink"),
        (lambda: _tar_with(_tar_member("../evil.txt", tarfile.REGTYPE), b"pwned"), r"\.\."),
        (lambda: _tar_with(_tar_member("repo/link", tarfile.SYMTYPE, "/etc/passwd")), "link"),
        (lambda: _tar_with(_tar_member("repo/hard", tarfile.LNKTYPE, "/etc/passwd")), "link"),
        (lambda: _tar_with(_tar_member("repo/null", tarfile.CHRTYPE)), "device"),
        (lambda: _tar_with(_tar_member("repo/fifo", tarfile.FIFOTYPE)), "device"),
    ],
    ids=[
        "dotdot",
        "absolute",
        "drive",
        "backslash",
        "zip-symlink",
        "tar-dotdot",
        "tar-symlink",
        "tar-hardlink",
        "tar-device",
        "tar-fifo",
    ],
)
def test_unsafe_archives_are_rejected_whole(tmp_path, archive, reason):
    path = tmp_path / "dl" / "a.bin"
    path.parent.mkdir()
    path.write_bytes(archive())
    dest = tmp_path / "out" / "x"
    dest.parent.mkdir()
    with pytest.raises(UnsafeArchiveError, match=reason):
        safe_extract(path, dest)
    assert not dest.exists() and not (tmp_path / "evil.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temp folder left behind


def test_extraction_size_cap(tmp_path):
    path = tmp_path / "a.zip"
    path.write_bytes(_zip({"a/big.bin": b"\0" * 10_000}))
    with pytest.raises(UnsafeArchiveError, match="limit"):
        safe_extract(path, tmp_path / "out", max_bytes=5_000)
    assert not (tmp_path / "out").exists()


def test_safe_extract_unpacks_zip_and_tar(tmp_path):
    entries = {"top/a.txt": b"a", "top/sub/b.txt": b"bb", "__MACOSX/top/._a.txt": b"junk"}
    (tmp_path / "a.zip").write_bytes(_zip(entries))
    assert safe_extract(tmp_path / "a.zip", tmp_path / "z") == (2, 3)
    assert (tmp_path / "z" / "top" / "sub" / "b.txt").read_bytes() == b"bb"
    assert not (tmp_path / "z" / "__MACOSX").exists()
    (tmp_path / "a.tgz").write_bytes(_tar_with(_tar_member("top/c.txt", tarfile.REGTYPE), b"ccc"))
    assert safe_extract(tmp_path / "a.tgz", tmp_path / "t") == (1, 3)


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info, data in members:
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


_OK = (_tar_member("top/ok.txt", tarfile.REGTYPE), b"ok")


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_tar_member("top/../../evil.txt", tarfile.REGTYPE), "escapes the destination"),
        (_tar_member("top/out", tarfile.SYMTYPE, "../../evil.txt"), "link"),
        (_tar_member("top/abs", tarfile.SYMTYPE, "/etc/passwd"), "link"),
        (_tar_member("top/hard", tarfile.LNKTYPE, "../evil.txt"), "link"),
        (_tar_member("top/sda", tarfile.BLKTYPE), "device"),
    ],
    ids=["dotdot", "symlink-outside", "symlink-absolute", "hardlink-outside", "block-device"],
)
def test_tar_data_filter_refuses_escapes_links_and_devices(tmp_path, member, reason):
    (tmp_path / "a.tar").write_bytes(_tar(_OK, (member, b"pwned" if member.isreg() else b"")))
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchiveError, match=f"a.tar: .*{reason}.*{member.name}"):
        safe_extract(tmp_path / "a.tar", tmp_path / "out" / "x")
    assert list((tmp_path / "out").iterdir()) == []  # refused before anything was written
    assert not (tmp_path / "evil.txt").exists()


def test_tar_data_filter_neutralises_absolute_paths_and_mode_bits(tmp_path):
    setuid = _tar_member("/abs/dir/run.sh", tarfile.REGTYPE)
    setuid.mode = 0o6777
    (tmp_path / "a.tar").write_bytes(_tar(_OK, (setuid, b"#!/bin/sh\n")))
    dest = tmp_path / "x"
    assert safe_extract(tmp_path / "a.tar", dest) == (2, 12)
    landed = dest / "abs" / "dir" / "run.sh"  # leading '/' stripped, as filter="data" does
    assert landed.read_bytes() == b"#!/bin/sh\n" and not Path("/abs/dir/run.sh").exists()
    assert landed.stat().st_mode & 0o7777 == 0o755  # no setuid/setgid, no group/other write


def test_tar_with_every_kind_of_attack_is_refused_whole(tmp_path):
    attacks = [
        _OK,
        (_tar_member("/abs/evil.txt", tarfile.REGTYPE), b"pwned"),
        (_tar_member("../evil.txt", tarfile.REGTYPE), b"pwned"),
        (_tar_member("top/link", tarfile.SYMTYPE, "../../.."), b""),
        (_tar_member("top/null", tarfile.CHRTYPE), b""),
    ]
    (tmp_path / "a.tgz").write_bytes(_tar(*attacks))
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchiveError, match=r"a\.tgz: path escapes the destination: '\.\./evil\.txt'"):
        safe_extract(tmp_path / "a.tgz", tmp_path / "out" / "x")
    assert list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


def test_tar_without_the_data_filter_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.delattr(tarfile, "data_filter")  # Python < 3.10.12 / 3.11.4
    (tmp_path / "a.tar").write_bytes(_tar(_OK))
    with pytest.raises(DataError, match=r"a\.tar: unpacking a tar archive safely needs Python >= 3\.10\.12"):
        safe_extract(tmp_path / "a.tar", tmp_path / "x")
    assert list(tmp_path.iterdir()) == [tmp_path / "a.tar"]


# --- the whole pipeline --------------------------------------------------------------------------------


def test_fetch_source_builds_manifest_from_real_metadata(mirror, figure1_zip):
    data, labels = figure1_zip
    mirror.serve("figure1", data)
    result = fetch_source("figure1", mirror=mirror.url)
    assert result.downloaded and result.extracted
    assert result.sha256 == hashlib.sha256(data).hexdigest() and result.size == len(data)
    got = {r.path.name: r.label or "UNLABELED" for r in result.records}
    assert got == labels  # every shared image found, labelled as the curated manifest says
    n_rows = len(_metadata_rows(SHARED_DATA / "metadata" / "figure1-metadata.csv", "cp1252"))
    assert result.excluded == {"image file missing": n_rows - len(labels)}
    back = load_records(result.manifest, labeled=False)
    assert len(back) == len(labels)
    with open(result.manifest, newline="") as f:
        header = next(csv.reader(f))
    assert header[:8] == [
        "path",
        "label",
        "patient_id",
        "source",
        "view",
        "license",
        "finding",
        "original_dataset",
    ]
    entry = fetch_cache.CacheIndex().get("figure1")
    assert entry["sha256"] == result.sha256 and entry["size"] == len(data)


def test_second_fetch_makes_no_request(mirror, figure1_zip):
    mirror.serve("figure1", figure1_zip[0])
    first = fetch_source("figure1", mirror=mirror.url)
    requests = len(mirror.log)
    second = fetch_source("figure1", mirror=mirror.url)
    assert len(mirror.log) == requests == 1
    assert not second.downloaded and not second.extracted
    assert [r.path for r in second.records] == [r.path for r in first.records]


def test_cached_archive_is_verified_on_later_use(mirror, figure1_zip):
    mirror.serve("figure1", figure1_zip[0])
    result = fetch_source("figure1", mirror=mirror.url)
    data = bytearray(result.archive.read_bytes())
    data[100] ^= 0xFF  # same size, different bytes
    result.archive.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="no longer matches sha256"):
        fetch_source("figure1", mirror=mirror.url)
    assert len(mirror.log) == 1


def test_publisher_checksum_mismatch_leaves_cache_empty(mirror, figure1_zip, monkeypatch):
    monkeypatch.setitem(SOURCES, "figure1", replace(SOURCES["figure1"], sha256="ab" * 32))
    mirror.serve("figure1", figure1_zip[0])
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch_source("figure1", mirror=mirror.url)
    root = fetch_cache.datasets_dir()
    assert not fetch_cache.extracted_dir("figure1").exists()
    assert [p for p in root.rglob("*") if p.is_file()] == []


def test_zip_slip_archive_from_mirror_is_rejected(mirror):
    mirror.serve("figure1", _zip({"repo/metadata.csv": b"patientid,finding\n", "repo/../../x.txt": b"pwned"}))
    with pytest.raises(UnsafeArchiveError):
        fetch_source("figure1", mirror=mirror.url)
    assert not fetch_cache.extracted_dir("figure1").exists()
    assert not (fetch_cache.datasets_dir() / "x.txt").exists()


# --- Kaggle ---------------------------------------------------------------------------------------------


def test_kaggle_without_kagglehub_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "kagglehub", None)
    with pytest.raises(DownloadError, match=r"cxrcae\[kaggle\]"):
        fetch_source("kermany")


def test_kaggle_source_through_kagglehub(monkeypatch, tmp_path, shared_data):
    import types

    rows = _shared_rows(shared_data, "kermany")[:6]
    root = tmp_path / "kaggle" / "chest_xray"
    for split, row in zip(["train", "train", "test", "test", "val", "val"], rows, strict=True):
        dest = root / split / row["label"] / Path(row["path"]).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(shared_data / "cxr" / row["path"])
    calls = []
    fake = types.ModuleType("kagglehub")
    fake.dataset_download = lambda handle, force_download=False: calls.append(handle) or str(root.parent)
    monkeypatch.setitem(sys.modules, "kagglehub", fake)

    result = fetch_source("kermany")
    assert calls == ["paultimothymooney/chest-xray-pneumonia"]
    assert {r.path.name: r.label for r in result.records} == {Path(r["path"]).name: r["label"] for r in rows}
    assert {r.patient_id for r in result.records} == {r["patient_id"] for r in rows}
    assert {r.extra["original_split"] for r in result.records} == {"train", "test", "val"}
    fetch_source("kermany")
    assert len(calls) == 1  # second fetch: kagglehub not even asked


# --- CLI ------------------------------------------------------------------------------------------------


def test_cli_list_shows_sources_and_cache_state(cli, mirror, figure1_zip):
    result = cli("fetch", "--list")
    assert result.exit_code == 0
    for name in SOURCES:
        assert name in result.stdout
    mirror.serve("figure1", figure1_zip[0])
    fetch_source("figure1", mirror=mirror.url)
    listed = {s["name"]: s for s in json.loads(cli("fetch", "--list", "--json").stdout)}
    assert listed["figure1"]["cached"] == "yes" and listed["actualmed"]["cached"] == "no"
    assert listed["figure1"]["size"] == len(figure1_zip[0])


def test_cli_fetch_merge_for_classify_and_pretrain(cli, mirror, figure1_zip, actualmed_zip, tmp_path):
    mirror.serve("figure1", figure1_zip[0])
    mirror.serve("actualmed", actualmed_zip)
    out = tmp_path / "merged.csv"
    result = cli("fetch", "figure1", "actualmed", "--mirror", mirror.url, "--merge", out)
    assert result.exit_code == 0, result.output
    assert "figure1" in result.stdout and "Merged manifest" in result.stdout
    classify = load_records(out, labeled=True)
    assert {r.source for r in classify} == {"figure1", "actualmed"}
    assert all(r.label in {"COVID", "NORMAL", "PNEUMONIA"} for r in classify)

    pretrain = tmp_path / "pretrain.csv"
    result = cli(
        "fetch",
        "figure1",
        "actualmed",
        "--merge",
        pretrain,
        "--for",
        "pretrain",
        "--json",
        env={"CXRCAE_MIRROR": mirror.url},
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [s["downloaded"] for s in payload["sources"]] == [False, False]
    everything = load_records(pretrain, labeled=False)
    unlabeled = sum(r.label is None for r in everything)
    assert unlabeled > 0 and len(everything) == len(classify) + unlabeled


def test_cli_unknown_source_and_failed_source(cli, mirror):
    result = cli("fetch", "nope")
    assert result.exit_code == 1 and "unknown source 'nope'" in result.output
    result = cli("fetch", "figure1", "--mirror", mirror.url, "--retries", "0")
    assert result.exit_code == 1 and "HTTP 404" in result.output
    assert "Traceback" not in result.output
