"""cxrcae: chest X-ray convolutional-autoencoder pretraining, fine-tuning, evaluation and sharing.

The top-level names are imported lazily so that ``import cxrcae`` (and ``cxrcae --help``) stay fast:
torch is only loaded when a model is actually needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "load_xray": "cxrcae.io",
    "CxrcaeError": "cxrcae.errors",
    "predict": "cxrcae.infer.prediction",
    "evaluate": "cxrcae.eval.evaluation",
    "calibrate": "cxrcae.eval.calibration",
    "load_encoder": "cxrcae.hub.resolve",
    "load_model": "cxrcae.hub.resolve",
    "save_checkpoint": "cxrcae.models.checkpoint",
    "pretrain": "cxrcae.train.pretraining",
    "finetune": "cxrcae.train.finetuning",
    "run_pipeline": "cxrcae.pipeline",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from cxrcae.errors import CxrcaeError  # noqa: F401
    from cxrcae.io import load_xray  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cxrcae' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


from cxrcae import _timm_hook  # noqa: E402,F401  (registers cxrcae_vgg_cae with timm once timm is imported)
