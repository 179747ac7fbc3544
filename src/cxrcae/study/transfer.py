"""Should I start from this encoder? ``cxrcae transfer``: encoders x labelled fractions x modes, paired.

For each encoder (``cxrcae.hub.encoders`` specs: ``bundled``, ``random``, a checkpoint folder or Hub id,
``timm:NAME[:WEIGHTS]``, ``imagenet-lite0``), each labelled fraction and each mode, on one split, seed and
budget:

- ``probe``: a linear probe on the frozen, globally pooled features (``cxrcae.eval.probe``), features
  encoded once per encoder; classification and multi-label data.
- ``finetune``: the task's fine-tuning (``cxrcae.train.finetune``) from the encoder, every layer trained from
  the start by default (``stages``), the learning rate chosen on validation loss among ``lrs``; any
  registered task. The CAE family only for now (``bundled``, ``random``, folders, Hub ids): a timm model
  has no cxrcae head or decoder yet.

Every encoder is paired with the first one, per mode and fraction (``encoder - first`` on the same test
patients). The task comes from the options (``--masks``: segment; ``--labels``/``--label-columns``:
multilabel; else classify) unless named. Files: ``OUT/transfer.json``, ``transfer.csv``,
``comparisons.csv``, ``transfer.png``; rerunning the same command continues (other ``--fractions``,
encoders or modes add cells without redoing the finished ones).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cxrcae.errors import CxrcaeError
from cxrcae.eval.probe import ProbeConfig
from cxrcae.hub.encoders import (
    IMAGENET_LITE0,
    TIMM_PREFIX,
    cae_encoder_ref,
    check_encoder,
    parse_timm_spec,
)
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.study.run import StudyResult, run_study
from cxrcae.study.spec import MODES, Arm, Recipe, StudySpec, label_source, slug
from cxrcae.tasks.base import TargetSource
from cxrcae.train import FinetuneConfig

KIND = "transfer"
PROBE_TASKS = ("classify", "multilabel")
HEAD_LR = 1e-3
"""The head stage's learning rate when ``stages`` starts with ``head`` (finetune's default)."""


@dataclass
class TransferConfig:
    """One transfer study; every cell shares the split, seed, image size and budget."""

    encoders: tuple[str, ...] = ("bundled", "random")
    """The first is the reference every other encoder is paired with."""
    fractions: tuple[float, ...] = (1.0,)
    modes: tuple[str, ...] = ("probe", "finetune")
    task: str | None = None
    """None: segment with ``masks``, multilabel with ``labels``/``label_columns``, else classify."""
    labels: str | None = None
    label_sep: str | None = None
    label_columns: tuple[str, ...] = ()
    masks: tuple[str, ...] = ()
    image_size: int = 224
    """Every encoder and mode sees this input size."""
    epochs: int = 20
    """Maximum epochs per fine-tuning stage (early stopping on validation loss)."""
    batch_size: int = 16
    stages: tuple[str, ...] = ("all",)
    lrs: tuple[float, ...] = (1e-4,)
    """Learning rates of the trained encoder layers; with several, each is run and validation loss picks."""
    head: str = "lstm"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 0
    limit_batches: int | None = None
    n_bootstrap: int = 1000

    @property
    def task_name(self) -> str:
        if self.task:
            return self.task
        if self.masks:
            return "segment"
        if self.labels or self.label_columns:
            return "multilabel"
        return "classify"

    def settings(self) -> dict[str, Any]:
        """What must match for a rerun to continue the study. Encoders, modes and fractions may change
        (each cell stands on its own, so a rerun adds cells); so may devices, workers and the bootstrap."""
        data = asdict(self)
        for key in ("encoders", "modes", "fractions", "device", "num_workers", "n_bootstrap"):
            data.pop(key)
        data["task"] = self.task_name
        return data

    def validate(self) -> None:
        if not self.encoders:
            raise CxrcaeError("--encoders needs at least one encoder (e.g. bundled,random)")
        if len(set(self.encoders)) != len(self.encoders):
            raise CxrcaeError(f"--encoders names one encoder twice: {', '.join(self.encoders)}")
        unknown = [m for m in self.modes if m not in MODES]
        if not self.modes or unknown:
            raise CxrcaeError(
                f"--modes takes {' and/or '.join(MODES)}, got {', '.join(self.modes) or 'none'}"
            )
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise CxrcaeError("--lrs needs positive learning rates (e.g. 1e-3,1e-4)")
        if "probe" in self.modes and self.task_name not in PROBE_TASKS:
            raise CxrcaeError(
                f"--modes probe fits a linear probe on pooled features: {' and '.join(PROBE_TASKS)} data "
                f"only, not {self.task_name}; use --modes finetune"
            )


def encoder_label(spec: str) -> str:
    """A short name for tables: a folder by its last two parts (``run/best``), a weights file by its name."""
    if spec.startswith(TIMM_PREFIX):
        name, weights = parse_timm_spec(spec)
        return f"timm:{name}" + (f":{weights.name}" if weights is not None else "")
    path = Path(spec)
    if len(path.parts) > 2:
        return "/".join(path.parts[-2:])
    return spec


def transfer_spec(cfg: TransferConfig) -> StudySpec:
    """The study of ``cfg``: one arm per mode x encoder, each compared with the first encoder's arm."""
    cfg.validate()
    task = cfg.task_name
    source = TargetSource(cfg.labels, cfg.label_sep, tuple(cfg.label_columns), tuple(cfg.masks))
    probe = ProbeConfig(
        image_size=cfg.image_size,
        seed=cfg.seed,
        labels=label_source(source),
        device=cfg.device,
        num_workers=cfg.num_workers,
        n_bootstrap=cfg.n_bootstrap,
    )
    probe.validate()
    arms: list[Arm] = []
    comparisons: list[tuple[str, str]] = []
    for encoder in cfg.encoders:
        check_encoder(encoder)
    for mode in (m for m in MODES if m in cfg.modes):
        names = []
        for encoder in cfg.encoders:
            recipes = _recipes(encoder, cfg, task, source) if mode == "finetune" else ()
            name = f"{mode}:{encoder_label(encoder)}"
            arms.append(Arm(name, mode, encoder, recipes, label=encoder_label(encoder)))
            names.append(name)
        comparisons += [(other, names[0]) for other in names[1:]]
    return StudySpec(
        kind=KIND,
        arms=tuple(arms),
        comparisons=tuple(comparisons),
        fractions=tuple(cfg.fractions),
        settings=cfg.settings(),
        task=task,
        source=source,
        seed=cfg.seed,
        device=cfg.device,
        num_workers=cfg.num_workers,
        n_bootstrap=cfg.n_bootstrap,
        probe=probe,
    )


def _recipes(encoder: str, cfg: TransferConfig, task: str, source: TargetSource) -> tuple[Recipe, ...]:
    if encoder.startswith(TIMM_PREFIX) or encoder == IMAGENET_LITE0:
        raise CxrcaeError(
            f"{encoder}: --modes finetune trains the cxrcae encoder architecture; a timm model can be "
            "compared with --modes probe only (for now)"
        )
    init = cae_encoder_ref(encoder)  # a missing folder fails here, before any data is read
    recipes = []
    for lr in cfg.lrs:
        recipe = FinetuneConfig(
            task=task,
            encoder=init,
            labels=source.labels,
            label_sep=source.label_sep,
            label_columns=source.label_columns,
            masks=source.masks,
            image_size=cfg.image_size,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            stages=tuple(cfg.stages),
            lr=HEAD_LR if "head" in cfg.stages else lr,
            lr_unfrozen=lr,
            head=cfg.head,
            seed=cfg.seed,
            device=cfg.device,
            precision=cfg.precision,
            num_workers=cfg.num_workers,
            limit_batches=cfg.limit_batches,
        )
        recipe.validate()
        suffix = f"-lr{lr:g}" if len(cfg.lrs) > 1 else ""
        recipes.append(Recipe(f"finetune-{slug(encoder)}{suffix}", recipe))
    return tuple(recipes)


def run_transfer(
    data: str | Path,
    out_dir: str | Path,
    cfg: TransferConfig | None = None,
    progress: ProgressFn = no_progress,
) -> StudyResult:
    """Run (or continue) the transfer study of ``cfg`` on ``data`` into ``out_dir`` (module docstring)."""
    cfg = cfg or TransferConfig()
    return run_study(data, out_dir, transfer_spec(cfg), names=("encoder", "reference"), progress=progress)
