"""Training settings as dataclasses: what the CLI fills in, what the run folder records, what resume reads.

Fine-tuning stages (``--stages``, comma-separated, run in order): ``head`` trains the head over a frozen
encoder; ``conv6`` ... ``conv2`` the head plus encoder blocks from that convolution up (ULMFiT style);
``all`` every parameter; ``gradual`` is ``conv6,conv5,conv4,conv3,conv2,all``.

Defaults follow the paper (and the authors' code where the two disagree); every field is saved under
``training`` in the best checkpoint's config.json, so a result can always be traced to its settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from cxrcae._parse import comma_list
from cxrcae.errors import CxrcaeError
from cxrcae.models import HEADS
from cxrcae.tasks import get_task
from cxrcae.tasks.base import TargetSource
from cxrcae.train.optim import OPTIMIZERS

ENCODER_BLOCKS = ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6")
GRADUAL = ("conv6", "conv5", "conv4", "conv3", "conv2", "all")
STAGE_NAMES = ("head", *reversed(ENCODER_BLOCKS[1:]), "all")


def expand_stages(stages: Sequence[str] | str) -> tuple[str, ...]:
    """Validate ``--stages`` and expand ``gradual``; raises ``CxrcaeError`` on unknown names."""
    if isinstance(stages, str):
        stages = comma_list(stages, what="--stages")
    out: list[str] = []
    for name in stages:
        name = name.strip().lower()
        if name == "gradual":
            out += GRADUAL
        elif name in STAGE_NAMES:
            out.append(name)
        else:
            raise CxrcaeError(f"unknown stage {name!r}; use {', '.join(STAGE_NAMES)} or gradual")
    if not out:
        raise CxrcaeError("--stages needs at least one stage (e.g. head,all)")
    return tuple(out)


BALANCE_MODES = ("none", "loss", "sampler", "source")
"""``loss``: class-weighted cross-entropy (n / (k * n_c)); ``sampler``: WeightedRandomSampler over classes;
``source``: WeightedRandomSampler over classes and, inside each class, over sources (square-root shares)."""


@dataclass(kw_only=True)
class TrainConfig:
    """Options shared by pretraining and fine-tuning."""

    image_size: int = 224
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    """NHWC memory format; None (auto) = whichever layout the machine's speed probe measured faster."""
    num_workers: int = 0
    limit_batches: int | None = None
    """Train and validate on at most this many batches per epoch (smoke runs)."""
    resize_mode: str = "pad"
    augment: bool = False
    cache_decoded: bool = True
    """Decode each image once into ``$CXRCAE_HOME/decoded`` (resized, uint16); later epochs read it back."""
    patience: int = 20
    min_delta: float = 1e-4
    optimizer: str = "adam"
    """Each stage's optimiser (``cxrcae.train.optim.OPTIMIZERS``): the paper's Adam by default."""
    weight_decay: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Rebuild from a saved dict, ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**values)

    def validate(self) -> None:
        if self.image_size < 32 or self.image_size % 32:
            raise CxrcaeError(f"--image-size must be a multiple of 32 (>= 32), got {self.image_size}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise CxrcaeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise CxrcaeError(f"--lr must be positive, got {self.lr}")
        if self.patience < 1:
            raise CxrcaeError(f"--patience must be at least 1, got {self.patience}")
        if self.limit_batches is not None and self.limit_batches < 1:
            raise CxrcaeError(f"--limit-batches must be at least 1, got {self.limit_batches}")
        if self.optimizer not in OPTIMIZERS:
            raise CxrcaeError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.weight_decay < 0:
            raise CxrcaeError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.resize_mode not in ("stretch", "pad"):
            raise CxrcaeError(f"--resize-mode must be stretch or pad, got {self.resize_mode!r}")


@dataclass(kw_only=True)
class PretrainConfig(TrainConfig):
    """Autoencoder pretraining: MSE, Adam 1e-3 (the paper's text says 1e-2), batch 64, up to 100 epochs,
    early stopping patience 20 / min_delta 1e-4 on validation MSE, letterboxed ('pad') inputs."""

    val_fraction: float = 0.1
    """Hold-out share when the data has no ``val`` split (grouped by patient where known)."""
    recon_samples: int = 8
    """Validation images shown in reconstructions.png."""

    def validate(self) -> None:
        super().validate()
        if not 0 < self.val_fraction < 1:
            raise CxrcaeError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")


@dataclass(kw_only=True)
class FinetuneConfig(TrainConfig):
    """Classifier fine-tuning with gradual unfreezing: stage ``head`` (encoder frozen, Adam ``lr`` 1e-3),
    then ``all`` (everything, Adam ``lr_unfrozen`` 1e-5); each stage up to ``epochs`` (20) epochs with early
    stopping patience 5 on validation loss, restoring the best weights; batch 16, stretched inputs."""

    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    lr_unfrozen: float = 1e-5
    """Learning rate of every stage that trains encoder layers."""
    resize_mode: str = "stretch"
    patience: int = 5
    min_delta: float = 0.0
    encoder: str | None = None
    """CAE/classifier/encoder checkpoint folder or Hub id; None trains from random initialisation."""
    head: str = "lstm"
    stages: tuple[str, ...] = ("head", "all")
    balance: str = "none"
    task: str = "classify"
    """What the model learns (``cxrcae.tasks``): its head or decoder, loss, metrics and outputs."""
    labels: str | None = None
    """Manifest column whose separated names are the targets (with ``label_sep``), e.g. ``finding``."""
    label_sep: str | None = None
    label_columns: tuple[str, ...] = ()
    """0/1 manifest columns, one per label."""
    masks: tuple[str, ...] = ()
    """Mask-path manifest columns (or ``masks/<name>/`` folders), one per structure."""

    def target_source(self) -> TargetSource:
        return TargetSource(self.labels, self.label_sep, tuple(self.label_columns), tuple(self.masks))

    def validate(self) -> None:

        super().validate()
        if not self.lr_unfrozen > 0:
            raise CxrcaeError(f"--lr-unfrozen must be positive, got {self.lr_unfrozen}")
        if self.head not in HEADS:
            raise CxrcaeError(f"unknown head {self.head!r}; choose one of: {', '.join(HEADS)}")
        if self.balance not in BALANCE_MODES:
            raise CxrcaeError(f"--balance must be one of {', '.join(BALANCE_MODES)}, got {self.balance!r}")
        expand_stages(self.stages)
        if not get_task(self.task).labelled:
            raise CxrcaeError(f"--task {self.task} trains without labels: use `cxrcae pretrain`")
