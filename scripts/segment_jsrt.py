"""The two-fold JSRT organ-segmentation protocol: train on one fold, test on the other, and back.

    python scripts/segment_jsrt.py --out runs/jsrt [--data ../shared/data/jsrt] [--encoder bundled]
        [--image-size 256] [--epochs 30] [--batch-size 8] [--stages head,all] [--lr 1e-3]
        [--lr-unfrozen 1e-4] [--augment/--no-augment] [--structures left_lung,right_lung,heart,...]
        [--limit-batches N] [--bootstrap 1000] [--folds 1,2]

``../shared/data/jsrt`` (247 JSRT radiographs with the SCR masks; research use, never copied into this
repository: see its README) has ``manifest.csv`` with ``path``, ``nodule``, one mask column per structure
and ``fold`` (1 or 2). For fold k this script writes ``OUT/fold{k}/split.csv`` (absolute paths into DATA,
nothing copied): train = fold k minus a validation slice (``--val-fraction`` of each nodule / no-nodule
group, seeded), test = the other fold. It fine-tunes ``--task segment`` from the encoder (``bundled``: the
one shipped in the package) into ``OUT/fold{k}/run`` (``cxrcae.train.finetune``; an interrupted fold is
resumed), evaluates the best checkpoint on the test fold with the segment task's own hooks (Dice, IoU, HD95
per structure with bootstrap CIs, worst/best overlays in ``OUT/fold{k}/eval``) and writes
``OUT/fold{k}/metrics.json``. A fold whose metrics.json exists is not run again. At the end:
``OUT/results.json`` and ``OUT/results.md``, a table of Dice per structure per fold (and their mean), also
printed.

Tiny smoke run (seconds to minutes on a CPU):
    python scripts/segment_jsrt.py --out /tmp/jsrt-smoke --image-size 64 --epochs 1 --limit-batches 2 \
        --stages head --bootstrap 0
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrcae import bundled
from cxrcae._atomic import atomic_write_text
from cxrcae.data import load_records
from cxrcae.errors import CxrcaeError
from cxrcae.hub.resolve import load
from cxrcae.io import load_for_model
from cxrcae.train import FinetuneConfig, finetune, resume_run

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "jsrt"
STRUCTURES = ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle")
EVAL_BATCH = 8


def split_rows(manifest: Path, fold: str, val_fraction: float, seed: int) -> list[dict[str, str]]:
    """The manifest's rows with absolute paths and a split column for training on ``fold``."""
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    base = manifest.parent
    folds = sorted({r["fold"] for r in rows})
    if fold not in folds:
        raise SystemExit(f"{manifest}: no fold {fold!r} (folds: {', '.join(folds)})")
    rng = random.Random(f"{seed}:{fold}")
    out = []
    for nodule in sorted({r.get("nodule", "") for r in rows}):
        group = [r for r in rows if r["fold"] == fold and r.get("nodule", "") == nodule]
        rng.shuffle(group)
        n_val = max(1, round(val_fraction * len(group)))
        out += [{**r, "split": "val" if i < n_val else "train"} for i, r in enumerate(group)]
    out += [{**r, "split": "test"} for r in rows if r["fold"] != fold]
    path_columns = ["path", *STRUCTURES]
    for r in out:
        for c in path_columns:
            if r.get(c):
                r[c] = str((base / r[c]).resolve())
    return out


def write_split(rows: list[dict[str, str]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def progress_printer(prefix: str):
    def report(task: str, done: int, total: int | None = None, info: str = "") -> None:
        if total and done == total and info.startswith("train "):  # one line per finished epoch
            print(f"{prefix} {task}: {info}", flush=True)

    return report


def train_fold(split_csv: Path, run_dir: Path, cfg: FinetuneConfig, prefix: str) -> str:
    """Fine-tune (or resume) into ``run_dir``; returns the best checkpoint folder."""
    report = progress_printer(prefix)
    if (run_dir / "last").is_dir():
        print(f"{prefix} resuming {run_dir}", flush=True)
        result = resume_run(run_dir, report, task="finetune")
    else:
        result = finetune(split_csv, run_dir, cfg, report)
    for note in result.notes:
        print(f"{prefix} note: {note}", flush=True)
    return result.best_dir


@torch.no_grad()
def evaluate_fold(best: str, split_csv: Path, out: Path, n_boot: int, seed: int) -> dict[str, Any]:
    """The segment task's evaluation hooks on the test rows: metrics.json's body, overlays beside it."""
    model = load(best, task="segment")
    config, task = model.config, model.task
    records = [r for r in load_records(split_csv, labeled=False) if r.split == "test"]
    size, mode = int(config["image_size"]), config.get("resize_mode", "stretch")
    targets = task.targets(records, config)
    probs = []
    for start in range(0, len(records), EVAL_BATCH):
        batch = records[start : start + EVAL_BATCH]
        images = torch.from_numpy(np.stack([load_for_model(r.path, size, mode) for r in batch]))
        probs.append(task.probabilities(model.net(images), config))
    probabilities = np.concatenate(probs)
    groups = [r.patient_id or "" for r in records]
    metrics = task.score(probabilities, targets, groups, config, n_boot=n_boot, seed=seed)
    paths = [str(r.path) for r in records]
    files = task.evaluation_files(out, paths, probabilities, targets, metrics, config)
    metrics["files"] = {k: str(v) for k, v in files.items()}
    return metrics


def results_table(results: dict[str, dict[str, Any]], structures: list[str]) -> str:
    folds = sorted(results)
    header = ["structure", *(f"Dice, test fold {results[k]['test_fold']}" for k in folds), "mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in [*structures, "mean"]:
        values = [results[k]["metrics"][name]["dice"] for k in folds]
        cells = [f"{v:.4f}" for v in values] + [f"{np.mean(values):.4f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSRT folder with manifest.csv")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--encoder", default="bundled", help="bundled, none, or a checkpoint folder / Hub id")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=30, help="maximum epochs per stage")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--stages", default="head,all")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the 'head' stage")
    parser.add_argument("--lr-unfrozen", type=float, default=1e-4, help="... of stages training the encoder")
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--structures", default=",".join(STRUCTURES))
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--limit-batches", type=int, default=None)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--folds", default="1,2", help="training folds to run (the other one is the test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    manifest = args.data / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: not found (the JSRT set lives in ../shared/data/jsrt)")
    encoder = args.encoder
    if encoder == "bundled":
        encoder = str(bundled.require(bundled.bundled_encoder(), "encoder", "pass --encoder PATH"))
    structures = [s.strip() for s in args.structures.split(",") if s.strip()]
    cfg = FinetuneConfig(
        task="segment",
        masks=tuple(structures),
        encoder=None if encoder == "none" else encoder,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()),
        lr=args.lr,
        lr_unfrozen=args.lr_unfrozen,
        patience=args.patience,
        augment=args.augment,
        limit_batches=args.limit_batches,
        seed=args.seed,
        device=args.device,
    )
    results: dict[str, dict[str, Any]] = {}
    for fold in [f.strip() for f in args.folds.split(",") if f.strip()]:
        fold_dir = args.out / f"fold{fold}"
        test_fold = "2" if fold == "1" else "1"
        prefix = f"[train fold {fold}, test fold {test_fold}]"
        metrics_path = fold_dir / "metrics.json"
        if metrics_path.is_file():
            print(f"{prefix} done before: {metrics_path}", flush=True)
            results[fold] = json.loads(metrics_path.read_text())
            continue
        start = time.perf_counter()
        split_csv = write_split(
            split_rows(manifest, fold, args.val_fraction, args.seed), fold_dir / "split.csv"
        )
        try:
            best = train_fold(split_csv, fold_dir / "run", cfg, prefix)
            trained = time.perf_counter()
            metrics = evaluate_fold(best, split_csv, fold_dir / "eval", args.bootstrap, args.seed)
        except CxrcaeError as exc:
            raise SystemExit(f"{prefix} {exc}") from None
        results[fold] = {
            "train_fold": fold,
            "test_fold": test_fold,
            "train_seconds": round(trained - start, 1),
            "eval_seconds": round(time.perf_counter() - trained, 1),
            "best": best,
            "metrics": metrics,
        }
        atomic_write_text(metrics_path, json.dumps(results[fold], indent=2) + "\n")
        headers, rows = load(best, task="segment").task.metric_rows(metrics)
        print(f"{prefix} " + " | ".join(headers), flush=True)
        for row in rows:
            print(f"{prefix} " + " | ".join(row), flush=True)

    table = results_table(results, structures)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary = {
        "protocol": "JSRT two-fold: train on fold k (minus a validation slice), test on the other fold",
        "settings": settings,
        "encoder": encoder,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "folds": results,
        "dice": {
            name: {f"test_fold_{r['test_fold']}": r["metrics"][name]["dice"] for r in results.values()}
            for name in [*structures, "mean"]
        },
    }
    atomic_write_text(args.out / "results.json", json.dumps(summary, indent=2) + "\n")
    seconds = sum(r.get("train_seconds", 0) + r.get("eval_seconds", 0) for r in results.values())
    command = "python scripts/segment_jsrt.py " + " ".join(sys.argv[1:] if argv is None else argv)
    markdown = (
        f"# JSRT two-fold segmentation\n\n`{command}`\n\n{table}\n\n"
        f"Image size {args.image_size} px, encoder `{args.encoder}`, stages {args.stages}; "
        f"{seconds / 60:.1f} min in all on {platform.machine()} ({torch.get_num_threads()} threads).\n"
    )
    atomic_write_text(args.out / "results.md", markdown)
    print(table)
    print(f"Written: {args.out / 'results.json'}, {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
