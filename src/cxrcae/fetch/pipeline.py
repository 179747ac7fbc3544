"""Sources from URL to manifest: download (or reuse and re-verify), extract safely, parse, write the CSV.

``fetch_source`` does one source; ``fetch_sources`` does several for ``cxrcae fetch``: one failed source
does not stop the others, and the merged manifest is written only when every source succeeded.

A second fetch of a cached source makes no network request: the archive is re-hashed against the sha256
recorded at its first download, the extracted tree is checked against its recorded file count and size, and
only the (cheap) parsing runs again. Anything that no longer matches is an error naming the file, never a
silent re-download.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cxrcae.data import Record, write_records
from cxrcae.errors import CxrcaeError, DataError, DownloadError
from cxrcae.fetch import cache
from cxrcae.fetch.download import download, file_sha256
from cxrcae.fetch.extract import DEFAULT_MAX_BYTES, safe_extract
from cxrcae.fetch.kaggle import kaggle_download
from cxrcae.fetch.parsers import parse_source
from cxrcae.fetch.registry import LABELS, SOURCES, Source, get_source
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

    archive = cache.archive_path(source.name, source.archive_name)
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
    url = source.download_url(mirror)
    if url is None:  # pragma: no cover - every non-Kaggle source has a URL
        raise DownloadError(f"{source.name}: no download URL")
    archive = cache.archive_path(source.name, source.archive_name)
    entry = index.get(source.name)
    expected_sha = source.sha256 or entry.get("sha256")
    expected_size = source.size or entry.get("size")
    result = FetchResult(source.name, Path(), cache.extracted_dir(source.name), [], archive=archive, url=url)

    if archive.is_file():
        _verify_cached(source, archive, expected_sha, expected_size, progress)
        digest, size = expected_sha or file_sha256(archive), archive.stat().st_size
        if not entry.get("sha256"):
            index.update(source.name, sha256=digest, size=size, url=entry.get("url", url), downloaded=_now())
    else:
        got = download(
            url,
            archive,
            sha256=expected_sha,
            size=expected_size,
            approx_size=source.approx_size,
            progress=progress,
            task=f"download {source.name}",
            retries=retries,
            timeout=timeout,
            backoff=backoff,
        )
        digest, size = got.sha256, got.size
        index.update(source.name, sha256=digest, size=size, url=url, downloaded=_now(), extracted=None)
        result.downloaded, result.resumed = True, got.resumed
    result.sha256, result.size = digest, size

    done = index.get(source.name).get("extracted") or {}
    root = result.root
    if root.is_dir() and done.get("archive_sha256") == digest:
        if cache.tree_stats(root) == (done.get("files"), done.get("bytes")):
            return result
    safe_extract(archive, root, max_bytes=max_bytes, progress=progress, task=f"extract {source.name}")
    files, written = cache.tree_stats(root)
    index.update(source.name, extracted={"archive_sha256": digest, "files": files, "bytes": written})
    result.extracted = True
    return result


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
    """How much of a source is cached: ``yes``, ``archive``, ``partial (N MB)`` or ``no``."""
    entry = cache.CacheIndex().get(source.name)
    if source.kaggle and entry.get("kaggle", {}).get("path") and Path(entry["kaggle"]["path"]).is_dir():
        return "yes"
    archive = cache.archive_path(source.name, source.archive_name)
    extracted = cache.extracted_dir(source.name)
    if archive.is_file():
        return "yes" if extracted.is_dir() and entry.get("extracted") else "archive"
    part = archive.with_name(archive.name + ".part")
    if part.is_file():
        return f"partial ({part.stat().st_size / 1e6:.1f} MB)"
    return "no"


def list_sources() -> list[dict[str, Any]]:
    """The registry with what is cached, for ``fetch --list``."""
    index = cache.CacheIndex()
    rows = []
    for source in SOURCES.values():
        entry = index.get(source.name)
        rows.append(
            {
                "name": source.name,
                "title": source.title,
                "images": source.images,
                "classes": list(source.classes),
                "size": entry.get("size") or source.size or source.approx_size,
                "size_exact": bool(entry.get("size") or source.size),
                "license": source.license,
                "host": "kaggle" if source.kaggle else "http",
                "url": source.url or f"https://www.kaggle.com/datasets/{source.kaggle}",
                "sha256": entry.get("sha256") or source.sha256,
                "cached": cache_status(source),
                "reference": source.reference,
                "description": source.description,
            }
        )
    return rows
