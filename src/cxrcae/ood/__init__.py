"""The out-of-distribution guard: should a model answer for this image?

- ``guard``: what is stored beside a classifier (its own autoencoder in ``ood.safetensors``, two thresholds
  in the ``ood`` block of config.json) and the scores it gives an image;
- ``screen``: the per-image screen ``cxrcae predict`` and ``cxrcae serve`` run (DICOM header, colour and
  contrast, the guard's scores), each verdict with a reason a person can read;
- fitting a guard: ``selection`` (which X-rays: training images only), ``sources`` (which autoencoder),
  ``decoder`` (the data and loss to train a decoder on a frozen encoder), ``thresholds`` (scores and their
  quantiles) and ``fitting`` (the steps before and after a decoder's training; the guard written at the end
  of fine-tuning).

Training is not done here: ``cxrcae calibrate-ood`` (``cxrcae.train.guard.calibrate_ood``) trains a decoder,
when one is needed, with the training engine, between ``fitting.plan_fit`` and ``fitting.store_fit``.
"""

from __future__ import annotations

from cxrcae.ood.guard import Guard, has_guard, load_guard, reconstruction_scores, save_guard
from cxrcae.ood.screen import Screen, Verdict

__all__ = [
    "Guard",
    "Screen",
    "Verdict",
    "has_guard",
    "load_guard",
    "reconstruction_scores",
    "save_guard",
]
