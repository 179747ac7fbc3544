"""Sharing checkpoints: resolve a folder or Hub id, push/pull through the Hub, and the model card.

``resolve`` (folder or ``user/repo[@rev]``, loading) <- ``transfer`` (push as one commit, strict pull)
<- ``card`` is used by both the Hub upload and every saved run (``best/README.md``). ``keras`` turns the
authors' Keras .h5 files into such folders (weights, config.json and card), read back once as a user would.
"""

from __future__ import annotations

from cxrcae.hub.resolve import (
    LoadedModel,
    as_loaded,
    download_checkpoint,
    encoder_state,
    load,
    load_checkpoint,
    load_encoder,
    load_model,
    parse_repo_ref,
    resolve_checkpoint,
)
from cxrcae.hub.transfer import PullResult, PushError, PushResult, pull, push_checkpoint
from cxrcae.models.encoder import PretrainedEncoder

__all__ = [
    "LoadedModel",
    "PretrainedEncoder",
    "PullResult",
    "PushError",
    "PushResult",
    "as_loaded",
    "download_checkpoint",
    "encoder_state",
    "load",
    "load_checkpoint",
    "load_encoder",
    "load_model",
    "parse_repo_ref",
    "pull",
    "push_checkpoint",
    "resolve_checkpoint",
]
