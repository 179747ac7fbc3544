"""Fetch public chest X-ray datasets safely and turn them into clean manifests.

``fetch_source("ieee8023")`` downloads (resumable, checksum-verified), unpacks (zip-slip safe) and parses a
registered source into records and a manifest CSV; ``write_merged`` joins several into one manifest and
``fetch_sources`` does several sources at once (what ``cxrcae fetch`` runs). See ``registry.SOURCES`` for
what can be fetched. Nothing here prints; progress goes through a callback.
"""

from __future__ import annotations

from cxrcae.fetch.download import Downloaded, download
from cxrcae.fetch.extract import UnsafeArchiveError, safe_extract
from cxrcae.fetch.parsers import Parsed, finding_to_label
from cxrcae.fetch.pipeline import (
    FetchFailure,
    FetchReport,
    FetchResult,
    fetch_source,
    fetch_sources,
    list_sources,
    merge_records,
    write_merged,
)
from cxrcae.fetch.registry import LABELS, SOURCES, Source, get_source

__all__ = [
    "LABELS",
    "SOURCES",
    "Downloaded",
    "FetchFailure",
    "FetchReport",
    "FetchResult",
    "Parsed",
    "Source",
    "UnsafeArchiveError",
    "download",
    "fetch_source",
    "fetch_sources",
    "finding_to_label",
    "get_source",
    "list_sources",
    "merge_records",
    "safe_extract",
    "write_merged",
]
