"""Latency of one ``POST /predict`` and throughput of concurrent ones, against the real ``cxrcae serve``.

    python scripts/bench_serve.py IMAGE [IMAGE ...] [--repeats 10] [--concurrent 20] [--workers 1] [--model M]

Starts ``python -m cxrcae serve --port 0`` on 127.0.0.1 (the bundled model unless ``--model``), with a queue
large enough for every concurrent request, then per image: a few warm-up calls, ``--repeats`` sequential
calls (median, min and max wall time seen by the client, HTTP included), and ``--concurrent`` calls sent at
once from as many threads (requests per second from the first send to the last answer). Both plain
``/predict`` and ``/predict?explain=1&preview=1`` (what the page asks for) are timed. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from cxrcae.serve.launch import ServerStartError, serve_in_subprocess

WARMUP = 3


@contextmanager
def start_server(*args: str, timeout: float = 300.0) -> Iterator[str]:
    """``python -m cxrcae serve --port 0 ARGS``: yields its URL once /health answers; Ctrl-C on exit."""
    try:
        with serve_in_subprocess(*args, timeout=timeout) as url:
            yield url
    except ServerStartError as exc:
        raise SystemExit(str(exc)) from None


def post(client: httpx.Client, url: str, image: Path, data: bytes) -> float:
    start = time.perf_counter()
    res = client.post(url, files={"file": (image.name, data)}, timeout=300)
    seconds = time.perf_counter() - start
    if res.status_code != 200:
        raise SystemExit(f"{image}: HTTP {res.status_code} {res.text[:200]}")
    return seconds


def bench(url: str, image: Path, query: str, repeats: int, concurrent: int) -> dict:
    data = image.read_bytes()
    target = f"{url}/predict{query}"
    with httpx.Client() as client:
        for _ in range(WARMUP):
            post(client, target, image, data)
        single = [post(client, target, image, data) for _ in range(repeats)]
    times: list[float] = []
    barrier = threading.Barrier(concurrent + 1)

    def one() -> None:
        with httpx.Client() as client:
            barrier.wait()
            times.append(post(client, target, image, data))

    threads = [threading.Thread(target=one) for _ in range(concurrent)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {
        "query": query or "(plain)",
        "latency_s": {
            "median": round(statistics.median(single), 4),
            "min": round(min(single), 4),
            "max": round(max(single), 4),
            "n": repeats,
        },
        "concurrent": {
            "requests": concurrent,
            "wall_s": round(wall, 3),
            "requests_per_s": round(concurrent / wall, 2),
            "median_latency_s": round(statistics.median(times), 3),
            "max_latency_s": round(max(times), 3),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    serve_args = ["--queue", str(max(args.concurrent, args.workers)), "--workers", str(args.workers)]
    if args.model:
        serve_args += ["--model", args.model]
    results = []
    with start_server(*serve_args) as url:
        model = httpx.get(f"{url}/model", timeout=30).json()
        for image in args.images:
            for query in ("", "?explain=1&preview=1"):
                row = bench(url, image, query, args.repeats, args.concurrent)
                results.append({"image": image.name, "bytes": image.stat().st_size, **row})
    report = {
        "model": {"id": model["id"], "version": model["version"], "image_size": model["image_size"]},
        "device": model["device"],
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
