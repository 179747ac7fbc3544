"""Start the real ``cxrcae serve`` in a child process and wait until it answers (scripts, tests, notebooks).

``serve_in_subprocess`` runs ``python -m cxrcae serve --port 0 ARGS`` on 127.0.0.1, reads the URL the server
prints, waits for ``GET /health`` and yields the URL; on exit it stops the server as Ctrl-C would (SIGINT),
killing it only if it does not stop within 30 s. A server that exits or never answers raises
``ServerStartError`` carrying its output. Standard library only, so it needs nothing beyond the serve extra.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from cxrcae.errors import CxrcaeError

_URL = re.compile(r"Open (http://127\.0\.0\.1:\d+)/")


class ServerStartError(CxrcaeError):
    """The child server exited or did not answer /health in time; the message ends with its output."""


@contextmanager
def serve_in_subprocess(
    *args: str, timeout: float = 300.0, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Yields ``http://127.0.0.1:PORT`` once the server's /health answers 200."""
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxrcae", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline, url, log = time.monotonic() + timeout, None, []
    try:
        while url is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ServerStartError("cxrcae serve did not start:\n" + "".join(log))
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            log.append(line)
            found = _URL.search(line)
            url = found.group(1) if found else None
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ServerStartError("cxrcae serve never answered /health:\n" + "".join(log))
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False
