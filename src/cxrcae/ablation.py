"""Does CAE pretraining help? The paper's classifier against its random-initialisation twins, paired.

For each labelled fraction (a label-efficiency curve; the autoencoder always pretrains on every allowed
train/val image, labels or not) three classifiers are trained on the same split, seed and epoch budget and
scored on the same test images:

- ``cae``: the paper's recipe over the CAE-pretrained encoder (head stage, then all layers at 1e-5);
- ``random``: the same recipe over a random encoder - the ablation the paper implies, but a handicapped
  one: its head stage trains over random features and its encoder then moves at 1e-5;
- ``random-plain``: a random encoder with its own best plain recipe - all layers from the start for the
  same epoch budget, the learning rate chosen among ``plain_lrs`` on **validation** loss (the test split
  only ever sees the chosen one).

``cae`` is compared with each baseline by a paired bootstrap over test patients (``eval.paired``).

Run folder: ``OUT/splits.csv``, ``OUT/cae/`` (pretraining), ``OUT/f<percent>/`` per fraction (its
``splits.csv`` and one run folder per arm, each with ``best/eval-test/``), and ``OUT/ablation.json``,
``ablation.csv``, ``comparisons.csv``, ``ablation.png``. Running the same command again continues an
interrupted study: finished arms are read back, an interrupted training run is resumed; other
``--fractions`` add (or leave out) points of the curve without retraining the others.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cxrcae._atomic import atomic_open, atomic_write_bytes, atomic_write_text
from cxrcae.data import label_fraction, load_records, write_records
from cxrcae.errors import CxrcaeError, DataError
from cxrcae.eval.evaluation import evaluate
from cxrcae.eval.paired import COMPARED, paired_bootstrap
from cxrcae.locking import FOLDER_LOCK, hold
from cxrcae.pipeline import headline, prepare_splits
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.train import FinetuneConfig, PretrainConfig, finetune, pretrain, resume_run
from cxrcae.train.state import find_resume_folder

STUDY_NAME = "ablation.json"
SETTINGS_NAME = "ablation-settings.json"
ARM_NAME = "arm.json"
ARMS = ("cae", "random", "random-plain")
BASELINES = ("random", "random-plain")


@dataclass
class AblationConfig:
    """One study's settings; all arms share the split, seed, image size, batch and epoch budget."""

    fractions: tuple[float, ...] = (1.0,)
    """Labelled share of the training images per point of the curve (val and test stay whole)."""
    image_size: int = 224
    pretrain_epochs: int = 100
    finetune_epochs: int = 20
    """Maximum epochs per stage; the plain recipe gets the same total (stages x this) in one stage."""
    plain_lrs: tuple[float, ...] = (1e-3, 1e-4)
    head: str = "lstm"
    encoder: str | None = None
    """An existing CAE (pretrain run folder, checkpoint or Hub id) instead of pretraining one here."""
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 0
    limit_batches: int | None = None
    n_bootstrap: int = 1000

    def validate(self) -> None:
        if not self.fractions:
            raise CxrcaeError("--fractions needs at least one labelled fraction (e.g. 0.05,0.25,1)")
        for f in self.fractions:
            if not 0 < f <= 1:
                raise CxrcaeError(f"a labelled fraction must be in (0, 1], got {f}")
        if not self.plain_lrs or any(not lr > 0 for lr in self.plain_lrs):
            raise CxrcaeError("--plain-lrs needs positive learning rates (e.g. 1e-3,1e-4)")

    def settings(self) -> dict[str, Any]:
        """What must match for a rerun to continue the same study. Devices and workers may change, and so
        may the fractions: each point of the curve is trained on its own, so a rerun can add points."""
        data = asdict(self)
        for key in ("device", "num_workers", "fractions"):
            data.pop(key)
        data["plain_lrs"] = [float(lr) for lr in self.plain_lrs]
        return data


@dataclass
class AblationResult:
    out_dir: Path
    splits: Path
    encoder: str
    points: list[dict[str, Any]]
    """Per fraction: ``{"fraction", "train_images", "arms": {arm: summary}, "comparisons": {...}}``."""
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "splits": str(self.splits),
            "encoder": self.encoder,
            "points": self.points,
            "files": self.files,
        }


def run_ablation(
    data: str | Path,
    out_dir: str | Path,
    cfg: AblationConfig | None = None,
    progress: ProgressFn = no_progress,
) -> AblationResult:
    """Run (or continue) the study of ``cfg`` on ``data`` into ``out_dir``; see the module docstring."""
    cfg = cfg or AblationConfig()
    cfg.validate()
    out = Path(out_dir).expanduser()
    with hold(out, folder=True):  # OUT is this study's alone, as a training run folder (cxrcae.locking)
        return _run_ablation(Path(data), out, cfg, progress)


def _run_ablation(data: Path, out: Path, cfg: AblationConfig, progress: ProgressFn) -> AblationResult:
    _claim(out, cfg)
    splits = out / "splits.csv"
    if not splits.exists():
        splits, _ = prepare_splits(data, out, cfg.seed, progress)
    elif data.expanduser().resolve() != splits.resolve():
        splits = _given_or_own(data, splits)
    encoder = cfg.encoder or _pretrained(splits, out / "cae", cfg, progress)

    records = load_records(splits, labeled=True)
    points = []
    for fraction in sorted(cfg.fractions):
        folder = out / f"f{_percent(fraction)}"
        folder.mkdir(parents=True, exist_ok=True)
        subset = label_fraction(records, fraction, cfg.seed)
        fraction_splits = folder / "splits.csv"
        if not fraction_splits.exists():
            write_records(subset, fraction_splits)
        arms = _train_arms(fraction_splits, folder, encoder, cfg, progress)
        points.append(
            {
                "fraction": fraction,
                "train_images": sum(1 for r in subset if r.split == "train" and r.label is not None),
                "arms": {name: {k: v for k, v in arm.items() if k != "scores"} for name, arm in arms.items()},
                "comparisons": _compare(arms, cfg),
            }
        )
    result = AblationResult(out_dir=out, splits=splits, encoder=str(encoder), points=points)
    result.files = _write_outputs(out, result, cfg)
    return result


def _claim(out: Path, cfg: AblationConfig) -> None:
    """Start the study in OUT, or continue it when OUT holds this very study; refuse any other folder."""
    settings = out / SETTINGS_NAME
    if settings.exists():
        saved = json.loads(settings.read_text())
        if saved != cfg.settings():
            changed = sorted(k for k in cfg.settings() if saved.get(k) != cfg.settings()[k])
            raise CxrcaeError(
                f"{out}: holds a study with other settings ({', '.join(changed)}); choose another --out"
            )
        return
    if any(p.name != FOLDER_LOCK for p in out.iterdir()):  # OUT exists: run_ablation holds its lock
        raise CxrcaeError(f"{out}: exists and is not an ablation study; choose another --out")
    atomic_write_text(settings, json.dumps(cfg.settings(), indent=2) + "\n")


def _given_or_own(data: Path, own: Path) -> Path:
    """A continued study keeps the split it started with; DATA is only checked to still exist."""
    if not data.expanduser().exists():
        raise DataError(f"{data}: no such file or folder")
    return own


def _pretrained(splits: Path, folder: Path, cfg: AblationConfig, progress: ProgressFn) -> str:
    """The CAE's best checkpoint, pretraining (or resuming) it on the train/val images when needed."""
    best = folder / "best"
    done = folder.parent / "cae.json"
    if not done.exists():
        if folder.exists():
            _continue_or_restart(folder, "pretrain", cfg, progress)
        else:
            pretrain(splits, folder, PretrainConfig(epochs=cfg.pretrain_epochs, **_common(cfg)), progress)
        atomic_write_text(done, json.dumps({"best_dir": str(best)}) + "\n")
    return str(best)


def _common(cfg: AblationConfig) -> dict[str, Any]:
    return dict(
        image_size=cfg.image_size,
        seed=cfg.seed,
        device=cfg.device,
        precision=cfg.precision,
        num_workers=cfg.num_workers,
        limit_batches=cfg.limit_batches,
    )


def _continue_or_restart(folder: Path, task: str, cfg: AblationConfig, progress: ProgressFn):
    """Resume an interrupted run; a folder with no resume state (killed before its first epoch) restarts."""
    try:
        find_resume_folder(folder)
    except CxrcaeError:
        shutil.rmtree(folder)
        return None
    return resume_run(folder, progress, task=task, device=cfg.device, num_workers=cfg.num_workers)


def _recipes(encoder: str, cfg: AblationConfig) -> dict[str, FinetuneConfig]:
    common = dict(head=cfg.head, **_common(cfg))
    paper = FinetuneConfig(epochs=cfg.finetune_epochs, **common)
    budget = cfg.finetune_epochs * len(paper.stages)
    recipes = {
        "cae": FinetuneConfig(epochs=cfg.finetune_epochs, encoder=encoder, **common),
        "random": FinetuneConfig(epochs=cfg.finetune_epochs, encoder=None, **common),
    }
    for lr in cfg.plain_lrs:
        recipes[f"random-plain-lr{lr:g}"] = FinetuneConfig(
            epochs=budget, encoder=None, stages=("all",), lr=lr, lr_unfrozen=lr, **common
        )
    return recipes


def _train_arms(
    splits: Path, folder: Path, encoder: str, cfg: AblationConfig, progress: ProgressFn
) -> dict[str, dict[str, Any]]:
    runs = {
        name: _trained(splits, folder / name, recipe, progress, cfg)
        for name, recipe in _recipes(encoder, cfg).items()
    }
    plain = {name: run for name, run in runs.items() if name.startswith("random-plain-")}
    chosen = min(plain, key=lambda name: _finite(plain[name]["best_val_loss"]))
    arms = {"cae": runs["cae"], "random": runs["random"], "random-plain": runs[chosen]}
    candidates = {
        name: {"lr": run["lr"], "best_val_loss": run["best_val_loss"]} for name, run in plain.items()
    }
    arms["random-plain"] = {**arms["random-plain"], "chosen_from": candidates}
    for arm in arms.values():
        arm.update(_tested(Path(arm["best_dir"]), splits, cfg, progress))
    return arms


def _finite(value: Any) -> float:
    return float(value) if value is not None and math.isfinite(float(value)) else math.inf


def _trained(
    splits: Path, folder: Path, recipe: FinetuneConfig, progress: ProgressFn, cfg: AblationConfig
) -> dict[str, Any]:
    """The arm's training summary, training (or resuming) it when it has not finished yet."""
    marker = folder / ARM_NAME
    if marker.exists():
        return json.loads(marker.read_text())
    result = _continue_or_restart(folder, "finetune", cfg, progress) if folder.exists() else None
    if result is None:
        result = finetune(splits, folder, recipe, progress)
    summary = {
        "best_dir": str(result.best_dir),
        "recipe": ",".join(recipe.stages),
        "encoder": recipe.encoder or "random",
        "lr": recipe.lr if recipe.stages == ("all",) else recipe.lr_unfrozen,
        "lr_head": recipe.lr if "head" in recipe.stages else None,
        "best_val_loss": result.best_val_loss,
        "epochs_run": result.epochs_run,
        "train_images": result.train_images,
        "seconds": result.seconds,
    }
    atomic_write_text(marker, json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _tested(best: Path, splits: Path, cfg: AblationConfig, progress: ProgressFn) -> dict[str, Any]:
    """Test metrics of one arm (fp32, evaluate's default) and its per-image scores for the pairing."""
    out = best / "eval-test"
    if not (out / "metrics.json").exists():
        evaluate(
            best,
            splits,
            split="test",
            out_dir=out,
            device=cfg.device,
            n_bootstrap=cfg.n_bootstrap,
            seed=cfg.seed,
            html=False,
            progress=progress,
        )
    metrics = json.loads((out / "metrics.json").read_text())
    return {"test": headline(metrics), "eval_dir": str(out), "scores": _scores(out / "predictions.csv")}


def _scores(predictions: Path) -> dict[str, Any]:
    """path -> (label, patient, probabilities) of the readable test images, from evaluate's CSV."""
    with predictions.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("status") == "ok"]
    names = [c[len("prob_") :] for c in (rows[0].keys() if rows else []) if c.startswith("prob_")]
    return {
        "class_names": names,
        "rows": {
            r["path"]: (r["label"], r["patient_id"], [float(r[f"prob_{n}"]) for n in names]) for r in rows
        },
    }


def _compare(arms: dict[str, dict[str, Any]], cfg: AblationConfig) -> dict[str, Any]:
    """``cae`` minus each baseline on the test images both scored, resampling patients jointly."""
    ours = arms["cae"]["scores"]
    out = {}
    for baseline in BASELINES:
        theirs = arms[baseline]["scores"]
        if ours["class_names"] != theirs["class_names"]:
            raise CxrcaeError(f"arms cae and {baseline} predict different classes; cannot pair them")
        common = sorted(set(ours["rows"]) & set(theirs["rows"]))
        index = {name: i for i, name in enumerate(ours["class_names"])}
        y = np.array([index[ours["rows"][p][0]] for p in common])
        a = np.array([ours["rows"][p][2] for p in common])
        b = np.array([theirs["rows"][p][2] for p in common])
        groups = [ours["rows"][p][1] or None for p in common]
        out[f"cae-vs-{baseline}"] = paired_bootstrap(
            y, a, b, groups=groups, n_resamples=max(cfg.n_bootstrap, 1), seed=cfg.seed
        )
    return out


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}".replace(".", "p")


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------


def arm_rows(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per fraction x arm: what ablation.csv holds and the CLI's table shows."""
    rows = []
    for point in points:
        for name, arm in point["arms"].items():
            test = arm["test"]
            rows.append(
                {
                    "fraction": point["fraction"],
                    "train_images": point["train_images"],
                    "arm": name,
                    "recipe": arm["recipe"],
                    "lr": arm["lr"],
                    "best_val_loss": arm["best_val_loss"],
                    "epochs_run": arm["epochs_run"],
                    **{k: test[k] for k in ("n", "accuracy", "macro_f1", "macro_auc")},
                    **{f"{k}_lo": (test[f"{k}_ci"] or [None, None])[0] for k in COMPARED},
                    **{f"{k}_hi": (test[f"{k}_ci"] or [None, None])[1] for k in COMPARED},
                }
            )
    return rows


def comparison_rows(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per fraction x baseline x metric: ``cae`` minus the baseline, paired 95% CI."""
    rows = []
    for point in points:
        for name, comp in point["comparisons"].items():
            for metric in COMPARED:
                m = comp[metric]
                rows.append(
                    {
                        "fraction": point["fraction"],
                        "comparison": name,
                        "metric": metric,
                        "cae": m["a"],
                        "baseline": m["b"],
                        "difference": m["difference"],
                        "ci_lo": m["ci"][0],
                        "ci_hi": m["ci"][1],
                        "p_cae_not_better": m["p_a_not_better"],
                        "n": comp["n"],
                        "unit": comp["unit"],
                    }
                )
    return rows


def _write_outputs(out: Path, result: AblationResult, cfg: AblationConfig) -> dict[str, str]:
    files = {
        "json": out / STUDY_NAME,
        "csv": out / "ablation.csv",
        "comparisons": out / "comparisons.csv",
        "plot": out / "ablation.png",
    }
    result.files = {k: str(v) for k, v in files.items()}
    study = {"settings": {**cfg.settings(), "fractions": sorted(cfg.fractions)}, **result.to_dict()}
    atomic_write_text(files["json"], json.dumps(_clean(study), indent=2, default=str) + "\n")
    _write_csv(files["csv"], arm_rows(result.points))
    _write_csv(files["comparisons"], comparison_rows(result.points))
    efficiency_plot(result.points, files["plot"])
    return result.files


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def efficiency_plot(points: Sequence[dict[str, Any]], path: Path) -> Path:
    """Test accuracy and macro AUC (95% CIs) per arm against the labelled fraction, and the paired
    difference ``cae`` minus each baseline: the label-efficiency curve at a glance."""
    fractions = [p["fraction"] for p in points]
    fig = Figure(figsize=(14, 4))
    axes = fig.subplots(1, 3)
    for ax, metric, title in (
        (axes[0], "accuracy", "test accuracy"),
        (axes[1], "macro_auc", "test macro AUC"),
    ):
        for k, arm in enumerate(ARMS):
            values = [p["arms"][arm]["test"][metric] for p in points]
            cis = [p["arms"][arm]["test"][f"{metric}_ci"] for p in points]
            _errorbar(ax, fractions, values, cis, arm, k)
        ax.set_title(title)
    ax = axes[2]
    for k, baseline in enumerate(BASELINES):
        comps = [p["comparisons"][f"cae-vs-{baseline}"]["accuracy"] for p in points]
        _errorbar(
            ax,
            fractions,
            [c["difference"] for c in comps],
            [c["ci"] for c in comps],
            f"cae - {baseline}",
            k + 1,
        )
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_title("paired accuracy difference (95% CI)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("labelled fraction of the training images")
        ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _errorbar(ax, xs, values, cis, label: str, k: int) -> None:
    """Arm ``k`` in its own colour (``C<k>``) in every panel, shifted so that bars do not overlap."""
    shift = [x * (1 + 0.04 * (k - 1)) for x in xs]  # side by side, not on top of each other
    ys = [math.nan if v is None else float(v) for v in values]
    lo = [_half(y, c, 0) for y, c in zip(ys, cis)]
    hi = [_half(y, c, 1) for y, c in zip(ys, cis)]
    ax.errorbar(shift, ys, yerr=[lo, hi], fmt="o-", capsize=3, label=label, color=f"C{k}")


def _half(y: float, ci: Sequence[float | None] | None, side: int) -> float:
    """One side of an error bar; 0 where there is no interval."""
    if ci is None or ci[side] is None or math.isnan(y):
        return 0.0
    return abs(y - float(ci[side]))
