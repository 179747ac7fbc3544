"""Download one file so that it is never lost or corrupted: stream, resume, verify, then move into place.

The bytes go to ``<dest>.part``; after a cut connection the next attempt (in this call, or a later run) asks
for the rest with an HTTP ``Range`` request. Only a file whose size and sha256 match what is expected is
renamed to ``dest``; a mismatching one is deleted, so the cache never holds bad data. stdlib only (urllib).
A publisher's MD5 (the only checksum some give) is checked alongside the sha256.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cxrcae import __version__
from cxrcae.errors import DownloadError
from cxrcae.progress import ProgressFn, no_progress

CHUNK = 1 << 20
DISK_MARGIN = 16 << 20
"""Free space kept in reserve beyond the bytes still to download."""
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str
    resumed: bool
    """True when at least one request continued a partial file with a Range header."""


class MissingFileError(DownloadError):
    """The server has no such file (HTTP 404 / 410): nothing to retry."""


class _Retry(Exception):
    """A transient failure: try again (resuming) after a pause."""


def file_sha256(path: Path, progress: ProgressFn = no_progress, task: str = "") -> str:
    """sha256 of a file read in chunks, reporting bytes hashed."""
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if task:
                progress(task, done, total, "verifying")
    return digest.hexdigest()


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    approx_size: int | None = None,
    md5: str | None = None,
    progress: ProgressFn = no_progress,
    task: str = "download",
    retries: int = 4,
    timeout: float = 60.0,
    backoff: float = 1.0,
) -> Downloaded:
    """Fetch ``url`` into ``dest``; verified against ``sha256``/``md5``/``size`` when given.

    Raises ``DownloadError`` (``MissingFileError`` when the server has no such file).

    Transient failures (timeouts, cut connections, HTTP 5xx/429) are retried ``retries`` times with
    exponential backoff, each retry resuming where the last stopped. A partial file survives a failure, so
    running the same command again resumes too.
    """
    if urllib.parse.urlsplit(url).scheme not in ("http", "https", "file"):
        raise DownloadError(f"{url}: not an http(s):// or file:// URL")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    state = _State(part)
    last_error = ""
    resumed = False
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            resumed |= _attempt(
                url, state, size=size, approx_size=approx_size, timeout=timeout, progress=progress, task=task
            )
            break
        except _Retry as exc:
            last_error = str(exc)
    else:
        raise DownloadError(
            f"{url}: download failed after {retries + 1} attempt(s): {last_error}; "
            f"{state.done} bytes kept in {part} - run the command again to resume"
        )

    digest = state.hexdigest()
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: expected {size} bytes, got {got}; the download was deleted")
    if sha256 is not None and digest != sha256.lower():
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{url}: checksum mismatch (expected sha256 {sha256}, got {digest}); the download was deleted"
        )
    if md5 is not None and state.md5.hexdigest() != md5.lower():
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{url}: checksum mismatch (expected md5 {md5}, got {state.md5.hexdigest()}); "
            "the download was deleted"
        )
    part.replace(dest)
    return Downloaded(path=dest, size=got, sha256=digest, resumed=resumed)


class _State:
    """The partial file and a running sha256 (and MD5) of its bytes, kept across attempts."""

    def __init__(self, part: Path):
        self.part = part
        self.digest = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.done = 0
        if part.exists():  # left by an earlier run: hash what is there, then continue after it
            with open(part, "rb") as f:
                while chunk := f.read(CHUNK):
                    self.update(chunk)

    def update(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.md5.update(chunk)
        self.done += len(chunk)

    def restart(self) -> None:
        self.part.unlink(missing_ok=True)
        self.digest = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.done = 0

    def hexdigest(self) -> str:
        if not self.part.exists():
            self.part.touch()
        return self.digest.hexdigest()


def _attempt(
    url: str,
    state: _State,
    *,
    size: int | None,
    approx_size: int | None,
    timeout: float,
    progress: ProgressFn,
    task: str,
) -> bool:
    """One HTTP request; returns whether it resumed. Raises ``_Retry`` (transient) or ``DownloadError``."""
    if size is not None and state.done > size:
        state.restart()
    if size is not None and state.done == size:
        return False  # complete from an earlier run; only verification is left
    headers = {"User-Agent": f"cxrcae/{__version__}", "Accept-Encoding": "identity"}
    offset = state.done
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            total = re.fullmatch(r"bytes \*/(\d+)", (exc.headers or {}).get("Content-Range", "").strip())
            if total and int(total.group(1)) == offset:
                return False  # an earlier run got every byte but stopped before verifying
            state.restart()  # our partial file is longer than the server's: start over
            raise _Retry("server refused to resume (HTTP 416); restarting") from None
        if exc.code in RETRYABLE_HTTP:
            raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
        if exc.code in (404, 410):
            raise MissingFileError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, FileNotFoundError):  # a file:// mirror without this file
            raise MissingFileError(f"{url}: no such file") from None
        if isinstance(exc.reason, OSError):  # refused, reset, timed out, name lookup failed
            raise _Retry(f"{type(exc.reason).__name__}: {exc.reason}") from None
        raise DownloadError(f"{url}: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:  # e.g. the server hung up before answering
        raise _Retry(f"{type(exc).__name__}: {exc}") from None

    with response:
        resumed = False
        status = getattr(response, "status", None) or 200  # file:// answers have no status
        if offset and status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                state.restart()
                raise _Retry("server answered an unexpected byte range; restarting")
            total = None if match.group(3) == "*" else int(match.group(3))
            resumed = True
        else:
            if offset:  # the server ignored Range and sends the whole file
                state.restart()
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if size is not None and total is not None and total != size:
            raise DownloadError(f"{url}: server offers {total} bytes, expected {size}")
        _check_disk_space(state.part.parent, (total or size or approx_size or 0) - state.done, url)
        _stream(response, state, total, progress, task, url)
    return resumed


def _stream(response, state: _State, total: int | None, progress: ProgressFn, task: str, url: str) -> None:
    started = time.monotonic()
    first = state.done
    with open(state.part, "ab" if state.done else "wb") as out:
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                why = f"{type(exc).__name__}: {exc}"
                raise _Retry(f"connection lost after {state.done} bytes ({why})") from None
            if not chunk:
                break
            try:
                out.write(chunk)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise DownloadError(f"{state.part}: disk full while downloading {url}") from None
                raise
            state.update(chunk)
            elapsed = max(time.monotonic() - started, 1e-6)
            progress(task, state.done, total, f"{(state.done - first) / elapsed / 1e6:.1f} MB/s")
    if total is not None and state.done < total:
        raise _Retry(f"connection closed after {state.done} of {total} bytes")


def _check_disk_space(folder: Path, needed: int, url: str) -> None:
    if needed <= 0:
        return
    free = shutil.disk_usage(folder).free
    if free < needed + DISK_MARGIN:
        raise DownloadError(
            f"{url}: needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free in {folder}"
            " (set CXRCAE_HOME to a larger disk)"
        )
