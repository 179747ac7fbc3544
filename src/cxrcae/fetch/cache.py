"""Where fetched data lives, and the index that remembers what each download's bytes must be.

Layout under ``datasets_dir()`` (``$CXRCAE_HOME/datasets``, default the user cache dir)::

    index.json                    what was downloaded: url, size, sha256, when; what was extracted from it
    downloads/<name>/<file>       verified archives (``<file>.part`` while downloading; resumable)
    extracted/<name>/             the archive's tree, moved into place only once complete
    extracted/<name>/<part>/      for a source of several files: each archive's tree (a plain file is
                                  copied as ``extracted/<name>/<file>``)
    manifests/<name>.csv          the source's manifest (paths relative to this file)

A source of one archive keeps its record at the top of its entry; a source of several files keeps one record
per file under ``parts`` (same fields).

The index is rewritten atomically, so an interrupted fetch never leaves it half-written.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from cxrcae._atomic import atomic_open
from cxrcae.errors import DataError
from cxrcae.paths import home_dir

INDEX_VERSION = 1


def datasets_dir() -> Path:
    return home_dir() / "datasets"


def archive_path(name: str, filename: str) -> Path:
    return datasets_dir() / "downloads" / name / filename


def extracted_dir(name: str) -> Path:
    return datasets_dir() / "extracted" / name


def manifest_path(name: str) -> Path:
    return datasets_dir() / "manifests" / f"{name}.csv"


class CacheIndex:
    """``index.json``: one entry per source; load, change with ``update``, and it is saved at once."""

    def __init__(self, path: Path | None = None):
        self.path = path or datasets_dir() / "index.json"
        self.entries: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            msg = f"{self.path}: unreadable cache index ({exc}); delete it to start afresh"
            raise DataError(msg) from None
        if not isinstance(data, dict) or not isinstance(data.get("sources"), dict):
            raise DataError(f"{self.path}: not a cxrcae cache index; delete it to start afresh")
        return data["sources"]

    def get(self, name: str) -> dict[str, Any]:
        return dict(self.entries.get(name, {}))

    def update(self, name: str, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the source's entry (None removes a field) and save the index atomically."""
        entry = self.entries.setdefault(name, {})
        for key, value in fields.items():
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value
        entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._write()
        return dict(entry)

    def part(self, name: str, filename: str) -> dict[str, Any]:
        """The record of one file of a source published as several (empty if none yet)."""
        return dict(self.entries.get(name, {}).get("parts", {}).get(filename, {}))

    def update_part(self, name: str, filename: str, **fields: Any) -> dict[str, Any]:
        """``update`` for one file's record under the source's ``parts``."""
        parts = dict(self.entries.get(name, {}).get("parts", {}))
        record = {**parts.get(filename, {}), **fields}
        parts[filename] = {k: v for k, v in record.items() if v is not None}
        self.update(name, parts=parts)
        return dict(parts[filename])

    def forget(self, name: str) -> None:
        if self.entries.pop(name, None) is not None:
            self._write()

    def _write(self) -> None:
        with atomic_open(self.path, "w") as f:
            json.dump({"version": INDEX_VERSION, "sources": self.entries}, f, indent=2, sort_keys=True)


def tree_stats(root: Path) -> tuple[int, int]:
    """(files, bytes) under ``root``: a cheap fingerprint that catches deleted or truncated files."""
    files = total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            files += 1
            total += os.path.getsize(os.path.join(dirpath, name))
    return files, total
