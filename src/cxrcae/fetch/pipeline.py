"""Sources from URL to manifest: download (or reuse and re-verify), extract safely, parse, write the CSV.

``fetch_source`` does one source; ``fetch_sources`` does several for ``cxrcae fetch``: one failed source
does not stop the others, and the merged manifest is written only when every source succeeded.

A second fetch of a cached source makes no network request: the archive is re-hashed against the sha256
recorded at its first download, the extracted tree is checked against its recorded file count and size, and
only the (cheap) parsing runs again. Anything that no longer matches is an error naming the file, never a
silent re-download. A source of several files (NIH ChestX-ray14) goes file by file the same way: an
interrupted fetch resumes at the file it stopped in, and one changed file is unpacked again alone.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cxrcae._atomic import atomic_open
from cxrcae.data import Record, write_records
from cxrcae.errors import CxrcaeError, DataError, DownloadError
from cxrcae.fetch import cache
from cxrcae.fetch.download import MissingFileError, download, file_sha256
from cxrcae.fetch.extract import DEFAULT_MAX_BYTES, safe_extract
from cxrcae.fetch.kaggle import kaggle_download
from cxrcae.fetch.parsers import parse_source
from cxrcae.fetch.registry import LABELS, SOURCES, Part, Source, get_source
from cxrcae.progress import ProgressFn, no_progress

Purpose = Literal["classify", "pretrain"]


@dataclass
class FetchResult:
    """What a fetch produced and what it had to do for it (``downloaded`` False: served from the cache)."""

    name: str
    manifest: Path
    root: Path
    records: list[Record]
    excluded: dict[str, int] = field(default_factory=dict)
    archive: Path | None = None
    sha256: str | None = None
    size: int | None = None
    url: str | None = None
    downloaded: bool = False
    resumed: bool = False
    extracted: bool = False
    files: list[dict[str, Any]] = field(default_factory=list)
    """Per downloaded file of a source of several: filename, url, sha256, size, what was done."""

    def counts(self) -> dict[str, int]:
        """Images per label (UNLABELED included), in the fixed label order."""
        found = Counter(r.label or "UNLABELED" for r in self.records)
        return {label: found.get(label, 0) for label in LABELS} | {
            k: v for k, v in found.items() if k not in LABELS
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "manifest": str(self.manifest),
            "root": str(self.root),
            "images": len(self.records),
            "labels": self.counts(),
            "excluded": dict(self.excluded),
            "archive": str(self.archive) if self.archive else None,
            "sha256": self.sha256,
            "size": self.size,
            "url": self.url,
            "downloaded": self.downloaded,
            "resumed": self.resumed,
            "extracted": self.extracted,
            "files": list(self.files),
        }


def fetch_source(
    name: str,
    *,
    mirror: str | None = None,
    include_ct: bool = False,
    include_lateral: bool = False,
    force: bool = False,
    progress: ProgressFn = no_progress,
    retries: int = 4,
    timeout: float = 60.0,
    backoff: float = 1.0,
    max_extract_bytes: int = DEFAULT_MAX_BYTES,
) -> FetchResult:
    """Fetch one registered source and write its manifest to ``cache.manifest_path(name)``.

    ``force`` discards the cached archive and extraction and downloads again. Raises ``DownloadError`` /
    ``DataError`` with a one-line reason.
    """
    source = get_source(name)
    index = cache.CacheIndex()
    if force:
        _discard(source, index)
    if source.kaggle and not mirror:
        result = _fetch_kaggle(source, index, force=force)
    else:
        result = _fetch_archive(source, index, mirror, progress, retries, timeout, backoff, max_extract_bytes)

    parsed = parse_source(
        source.parser,
        result.root,
        source=source.name,
        license_=source.license,
        include_ct=include_ct,
        include_lateral=include_lateral,
    )
    records = [r for r in parsed.records if r.path.is_file()]
    excluded = Counter(parsed.excluded)
    if len(records) < len(parsed.records):
        excluded["image file missing"] += len(parsed.records) - len(records)
    if not records:
        raise DataError(f"{source.name}: no images found in {result.root} (has the archive layout changed?)")
    result.records = records
    result.excluded = dict(excluded)
    result.manifest = write_records(records, cache.manifest_path(source.name))
    return result


def _discard(source: Source, index: cache.CacheIndex) -> None:

    for part in source.files:
        archive = cache.archive_path(source.name, part.filename)
        for path in (archive, archive.with_name(archive.name + ".part")):
            path.unlink(missing_ok=True)
    shutil.rmtree(cache.extracted_dir(source.name), ignore_errors=True)
    index.forget(source.name)


def _fetch_kaggle(source: Source, index: cache.CacheIndex, *, force: bool) -> FetchResult:

    entry = index.get(source.name).get("kaggle", {})
    root = Path(entry["path"]) if entry.get("path") else None
    if root is not None and root.is_dir() and not force:
        files, size = cache.tree_stats(root)
        if (files, size) != (entry.get("files"), entry.get("bytes")):
            raise DataError(
                f"{source.name}: the Kaggle download in {root} changed since it was fetched "
                f"({entry.get('files')} files, {entry.get('bytes')} bytes recorded; "
                f"{files} files, {size} bytes now); "
                "run with --force to download it again"
            )
        return FetchResult(source.name, Path(), root, [])
    root = kaggle_download(source.kaggle or "", force=force)
    files, size = cache.tree_stats(root)
    record = {"handle": source.kaggle, "path": str(root), "files": files, "bytes": size, "fetched": _now()}
    index.update(source.name, kaggle=record)
    return FetchResult(source.name, Path(), root, [], downloaded=True, url=f"kaggle:{source.kaggle}")


def _fetch_archive(source, index, mirror, progress, retries, timeout, backoff, max_bytes) -> FetchResult:
    """Download (or re-verify) and unpack every file of an HTTP source into its extracted folder.

    One archive unpacks into the folder itself; each file of a source of several gets its own place in it
    (``<folder>/<unpack_name>``) and its own record in the index, so each is resumed, verified and
    unpacked on its own.
    """
    root = cache.extracted_dir(source.name)
    result = FetchResult(source.name, Path(), root, [])
    several = bool(source.parts)
    for part in source.files:
        slot = _Slot(index, source.name, part.filename if several else None)
        dest = root / part.unpack_name if several else root
        opts = {"retries": retries, "timeout": timeout, "backoff": backoff, "max_bytes": max_bytes}
        got = _fetch_file(source, part, slot, dest, mirror, progress, several=several, **opts)
        result.downloaded |= got.downloaded
        result.resumed |= got.resumed
        result.extracted |= got.extracted
        if several:
            result.files.append(got.as_dict())
        else:
            result.archive, result.url = got.archive, got.url
            result.sha256, result.size = got.sha256, got.size
    if several:
        result.size = sum(f["size"] or 0 for f in result.files)
    return result


@dataclass
class _Slot:
    """Where one file's record lives in the cache index: the source's entry, or its ``parts`` record."""

    index: cache.CacheIndex
    name: str
    part: str | None = None

    def get(self) -> dict[str, Any]:
        return self.index.get(self.name) if self.part is None else self.index.part(self.name, self.part)

    def update(self, **fields: Any) -> None:
        if self.part is None:
            self.index.update(self.name, **fields)
        else:
            self.index.update_part(self.name, self.part, **fields)


@dataclass
class _File:
    """What happened to one downloaded file."""

    filename: str
    url: str
    archive: Path
    sha256: str | None = None
    size: int | None = None
    downloaded: bool = False
    resumed: bool = False
    extracted: bool = False
    absent: bool = False
    """An optional file the server does not have (recorded; asked for again only with --force)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "url": self.url,
            "sha256": self.sha256,
            "size": self.size,
            "downloaded": self.downloaded,
            "resumed": self.resumed,
            "extracted": self.extracted,
            "absent": self.absent,
        }


def _fetch_file(
    source: Source, part: Part, slot: _Slot, dest: Path, mirror, progress, *, several: bool, **opts
) -> _File:
    url = source.download_url(mirror, part) or ""
    archive = cache.archive_path(source.name, part.filename)
    entry = slot.get()
    got = _File(part.filename, url, archive)
    if part.optional and entry.get("absent") and not archive.is_file():
        got.absent, got.url = True, entry.get("url", url)
        return got
    expected_sha = part.sha256 or entry.get("sha256")
    expected_size = part.size or entry.get("size")
    if archive.is_file():
        _verify_cached(source, archive, expected_sha, expected_size, progress)
        digest, size = expected_sha or file_sha256(archive), archive.stat().st_size
        if not entry.get("sha256"):
            slot.update(sha256=digest, size=size, url=entry.get("url", url), downloaded=_now())
    else:
        try:
            fetched = download(
                url,
                archive,
                sha256=expected_sha,
                md5=part.md5,
                size=expected_size,
                approx_size=part.approx_size,
                progress=progress,
                task=f"download {source.name}/{part.filename}" if several else f"download {source.name}",
                retries=opts["retries"],
                timeout=opts["timeout"],
                backoff=opts["backoff"],
            )
        except MissingFileError:
            if not part.optional:
                raise
            _remove(dest)
            slot.update(absent=True, url=url, checked=_now(), extracted=None)
            got.absent = True
            return got
        digest, size = fetched.sha256, fetched.size
        slot.update(sha256=digest, size=size, url=url, downloaded=_now(), extracted=None, absent=None)
        got.downloaded, got.resumed = True, fetched.resumed
    got.sha256, got.size = digest, size

    done = slot.get().get("extracted") or {}
    if done.get("archive_sha256") == digest and _stats(dest) == (done.get("files"), done.get("bytes")):
        return got
    if part.is_archive:
        task = f"extract {source.name}/{part.filename}" if several else f"extract {source.name}"
        safe_extract(archive, dest, max_bytes=opts["max_bytes"], progress=progress, task=task)
    else:  # a plain file (a label CSV): copied next to the unpacked archives
        _remove(dest)
        with open(archive, "rb") as src, atomic_open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
    files, written = _stats(dest) or (0, 0)
    slot.update(extracted={"archive_sha256": digest, "files": files, "bytes": written})
    got.extracted = True
    return got


def _stats(path: Path) -> tuple[int, int] | None:
    """(files, bytes) of an unpacked tree or a copied file; None when it is not there."""
    if path.is_file():
        return 1, path.stat().st_size
    if path.is_dir():
        return cache.tree_stats(path)
    return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _verify_cached(source: Source, archive: Path, sha: str | None, size: int | None, progress) -> None:
    """A cached archive must still be the bytes first downloaded (or the publisher's checksum)."""
    actual_size = archive.stat().st_size
    hint = f"delete {archive} or run with --force to download it again"
    if size is not None and actual_size != size:
        raise DownloadError(f"{archive}: cached archive is {actual_size} bytes, {size} were recorded; {hint}")
    if sha is not None:
        actual = file_sha256(archive, progress, task=f"verify {source.name}")
        if actual != sha:
            raise DownloadError(
                f"{archive}: cached archive no longer matches sha256 {sha} (got {actual}); {hint}"
            )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def merge_records(results: Iterable[FetchResult], *, purpose: Purpose = "classify") -> list[Record]:
    """All sources' records in one list; ``classify`` drops unlabeled images, ``pretrain`` keeps them."""
    if purpose not in ("classify", "pretrain"):
        raise DataError(f"purpose must be classify or pretrain, got {purpose!r}")
    return [r for res in results for r in res.records if purpose == "pretrain" or r.label is not None]


def write_merged(results: Sequence[FetchResult], out: Path, *, purpose: Purpose = "classify") -> Path:
    records = merge_records(results, purpose=purpose)
    if not records:
        raise DataError(f"{out}: nothing to write (no labelled images; use --for pretrain to keep unlabeled)")
    return write_records(records, out)


@dataclass
class FetchFailure:
    """A source that could not be fetched, with the one-line reason."""

    name: str
    error: str


@dataclass
class FetchReport:
    """What ``fetch_sources`` did: each source's result or failure, and the merged manifest if written."""

    results: list[FetchResult]
    failures: list[FetchFailure]
    merge: Path | None
    """The merged manifest asked for (written only when no source failed; see ``merged``)."""
    merged: Path | None
    purpose: Purpose

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        """0 when every source was fetched, 1 when any failed."""
        return 0 if self.ok else 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "sources": [r.as_dict() for r in self.results],
            "failed": [{"name": f.name, "error": f.error} for f in self.failures],
            "merged": str(self.merged) if self.merged else None,
            "for": self.purpose,
        }


def fetch_sources(
    names: Sequence[str],
    *,
    merge: Path | None = None,
    purpose: Purpose = "classify",
    mirror: str | None = None,
    include_ct: bool = False,
    include_lateral: bool = False,
    force: bool = False,
    progress: ProgressFn = no_progress,
    retries: int = 4,
    timeout: float = 60.0,
    backoff: float = 1.0,
    max_extract_bytes: int = DEFAULT_MAX_BYTES,
) -> FetchReport:
    """``fetch_source`` each of ``names`` (duplicates once, in order) and, with ``merge``, join them there.

    An unknown name raises ``DataError`` before anything is downloaded. A source that fails with a
    ``CxrcaeError`` is recorded in ``failures`` and the others are still fetched; the merged manifest is
    written only when none failed (``write_merged``'s ``DataError`` when it would be empty propagates).
    """
    for name in names:
        get_source(name)
    results: list[FetchResult] = []
    failures: list[FetchFailure] = []
    for name in dict.fromkeys(names):
        try:
            results.append(
                fetch_source(
                    name,
                    mirror=mirror or None,
                    include_ct=include_ct,
                    include_lateral=include_lateral,
                    force=force,
                    progress=progress,
                    retries=retries,
                    timeout=timeout,
                    backoff=backoff,
                    max_extract_bytes=max_extract_bytes,
                )
            )
        except CxrcaeError as exc:  # one bad source does not stop the others
            failures.append(FetchFailure(name, str(exc)))
    merged = None
    if merge is not None and results and not failures:
        merged = write_merged(results, merge, purpose=purpose)
    return FetchReport(results, failures, merge, merged, purpose)


def cache_status(source: Source) -> str:
    """How much of a source is cached: ``yes``, ``archive``, ``partial (...)`` or ``no``."""
    entry = cache.CacheIndex().get(source.name)
    if source.kaggle and entry.get("kaggle", {}).get("path") and Path(entry["kaggle"]["path"]).is_dir():
        return "yes"
    extracted = cache.extracted_dir(source.name)
    if source.parts:
        records = [entry.get("parts", {}).get(p.filename, {}) for p in source.parts]
        have = [
            cache.archive_path(source.name, p.filename).is_file() or r.get("absent")
            for p, r in zip(source.parts, records, strict=True)
        ]
        if all(have):
            unpacked = all(r.get("extracted") or r.get("absent") for r in records)
            return "yes" if extracted.is_dir() and unpacked else "archive"
        partial = sum(_part_size(source.name, p.filename) for p in source.parts)
        if any(have) or partial:
            more = f", {partial / 1e6:.1f} MB of the next" if partial else ""
            return f"partial ({sum(map(bool, have))} of {len(have)} files{more})"
        return "no"
    archive = cache.archive_path(source.name, source.archive_name)
    if archive.is_file():
        return "yes" if extracted.is_dir() and entry.get("extracted") else "archive"
    if partial := _part_size(source.name, source.archive_name):
        return f"partial ({partial / 1e6:.1f} MB)"
    return "no"


def _part_size(name: str, filename: str) -> int:
    """Bytes of an interrupted download (its ``.part`` file), 0 when there is none."""
    archive = cache.archive_path(name, filename)
    part = archive.with_name(archive.name + ".part")
    return part.stat().st_size if part.is_file() else 0


def _page(source: Source) -> str:
    """The URL to show for a source: its archive, its Kaggle page, or (several files) its homepage."""
    if source.kaggle:
        return f"https://www.kaggle.com/datasets/{source.kaggle}"
    return source.url or source.homepage


def list_sources() -> list[dict[str, Any]]:
    """The registry with what is cached, for ``fetch --list``."""
    index = cache.CacheIndex()
    rows = []
    for source in SOURCES.values():
        entry = index.get(source.name)
        size, exact = entry.get("size") or source.size, bool(entry.get("size") or source.size)
        if source.parts:  # exact once every file the server has was downloaded
            records = [entry.get("parts", {}).get(p.filename, {}) for p in source.parts]
            recorded = [r.get("size") for r in records if not r.get("absent")]
            exact = all(recorded)
            size = sum(recorded) if exact else None
        rows.append(
            {
                "name": source.name,
                "title": source.title,
                "images": source.images,
                "classes": list(source.classes),
                "size": size or source.approx_size,
                "size_exact": exact,
                "license": source.license,
                "host": "kaggle" if source.kaggle else "http",
                "url": _page(source),
                "files": [p.filename for p in source.files],
                "sha256": None if source.parts else entry.get("sha256") or source.sha256,
                "cached": cache_status(source),
                "reference": source.reference,
                "description": source.description,
            }
        )
    return rows
