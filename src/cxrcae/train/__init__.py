"""Training: autoencoder pretraining and gradual-unfreezing fine-tuning, with resumable run folders.

``pretrain(data, out_dir, PretrainConfig(...))`` and ``finetune(data, out_dir, FinetuneConfig(...))`` return
a ``TrainResult``; ``resume_run(out_dir)`` continues an interrupted run of either kind.
"""

from cxrcae.train.config import FinetuneConfig, PretrainConfig, TrainConfig
from cxrcae.train.engine import NonFiniteLossError, TrainResult
from cxrcae.train.finetuning import finetune
from cxrcae.train.pretraining import pretrain
from cxrcae.train.resume import resume_run

__all__ = [
    "FinetuneConfig",
    "NonFiniteLossError",
    "PretrainConfig",
    "TrainConfig",
    "TrainResult",
    "finetune",
    "pretrain",
    "resume_run",
]
