"""Memory rows: peak resident memory of ``cxrcae predict --output`` at two input counts, each in a fresh
process.

The peak is the kernel's ``ru_maxrss`` of that process and the workers it waited for (not the benchmark's
own). Streaming keeps it flat whatever the number of files: each row's ``vs_first`` is its peak over the
first's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrcae.errors import CxrcaeError
from cxrcae.io import find_images
from cxrcae.progress import ProgressFn, no_progress


def bench_predict_memory(
    inputs: Sequence[str | Path],
    counts: Sequence[int] = (100, 2000),
    model: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: ProgressFn = no_progress,
) -> list[dict[str, Any]]:
    """Peak RSS of ``cxrcae predict FILES --output preds.csv`` on the first ``n`` files, for each ``n`` in
    ``counts``, each in a fresh process (the bundled model unless ``model``); the last row gives each peak
    as a ratio of the first (flat memory: close to 1)."""
    files, _ = find_images(inputs)
    if len(files) < max(counts):
        raise CxrcaeError(f"need {max(counts)} images for the memory benchmark, found {len(files)}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cxrcae-bench-") as tmp:
        for i, n in enumerate(counts):
            folder = Path(tmp) / f"inputs{n}"
            folder.mkdir()
            for k, path in enumerate(files[:n]):  # one folder argument, whatever n is
                os.symlink(Path(path).resolve(), folder / f"{k:06d}{Path(path).suffix}")
            cmd = [sys.executable, "-m", "cxrcae", "predict", str(folder), "--output", f"{tmp}/p{n}.csv"]
            cmd += ["--batch-size", str(batch_size), "--num-workers", str(num_workers), "--quiet"]
            cmd += ["--model", str(model)] if model is not None else []
            progress("predict memory", i, len(counts), f"{n} images")
            start = time.perf_counter()
            with open(Path(tmp) / "stderr.txt", "w+b") as err:
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
                _, status, usage = os.wait4(proc.pid, 0)  # this process's own peak, not the benchmark's
                proc.returncode = os.waitstatus_to_exitcode(status)
                seconds = time.perf_counter() - start
                err.seek(0)
                error = err.read().decode(errors="replace").strip()
            if proc.returncode not in (0, 3):
                raise CxrcaeError(f"predict failed in the memory benchmark: {error or proc.returncode}")
            peak_mb = usage.ru_maxrss / 1024  # kB on Linux
            row = {"task": "predict-memory", "images": n, "peak_rss_mb": round(peak_mb, 1)}
            rows.append(
                {**row, "seconds": round(seconds, 2), "batch_size": batch_size, "workers": num_workers}
            )
    progress("predict memory", len(counts), len(counts), "")
    base = rows[0]["peak_rss_mb"]
    for row in rows:
        row["vs_first"] = round(row["peak_rss_mb"] / base, 4)
    return rows
