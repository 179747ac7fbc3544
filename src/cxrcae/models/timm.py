"""``cxrcae_vgg_cae`` for timm: the paper's X-ray-pretrained encoder as a timm backbone.

Registered automatically once timm is imported after ``import cxrcae`` (see ``cxrcae._timm_hook``). The model
keeps the encoder's parameter names (``stages.conv1`` ... ``stages.conv6``), so any cxrcae checkpoint loads:
an encoder-only ``model.safetensors`` as is, an autoencoder's or classifier's through their ``encoder.*``
tensors (decoder and head dropped). Loading checks every encoder tensor is present.

    import cxrcae, timm
    m = timm.create_model("cxrcae_vgg_cae", pretrained=True,
                          pretrained_cfg_overlay=dict(file="ckpt/model.safetensors"))  # or hf_hub_id=
    m.forward_features(x)  # (B, 512, 7, 7) at 224 px;  m(x): (B, 512) pooled (num_classes=0)

``num_classes=N`` adds a fresh linear classifier on the pooled features; ``features_only=True`` returns the
six stage outputs (strides 1, 2, 4, 8, 16, 32). Pixels: [0, 1], mean 0 / std 1, gray replicated to 3 channels
(``cxrcae.io.load_for_model`` prepares files exactly so).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from timm.layers import ClassifierHead
from timm.models import PretrainedCfg, build_model_with_cfg, generate_default_cfgs, register_model

from cxrcae import bundled
from cxrcae.errors import CheckpointError
from cxrcae.models.cae import NUM_FEATURES, CAEEncoder
from cxrcae.models.encoder import INTERPOLATION

__all__ = ["CxrcaeVggCae", "checkpoint_filter_fn", "cxrcae_vgg_cae"]

# Pre-pool activations of each resolution, then the bottleneck: (module, channels, stride).
_FEATURES = (
    ("stages.relu2", 64, 1),
    ("stages.relu3", 128, 2),
    ("stages.relu4", 256, 4),
    ("stages.relu5", 512, 8),
    ("stages.relu6", 512, 16),
    ("stages.pool5", 512, 32),
)


class CxrcaeVggCae(CAEEncoder):
    """The cxrcae encoder with timm's backbone API (forward_features / forward_head / reset_classifier)."""

    def __init__(
        self, num_classes: int = 0, in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0
    ):
        super().__init__(in_chans)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = NUM_FEATURES
        self.drop_rate = drop_rate
        self.feature_info = [dict(num_chs=c, reduction=r, module=m) for m, c, r in _FEATURES]
        self.head = ClassifierHead(NUM_FEATURES, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    @torch.jit.ignore
    def get_classifier(self) -> torch.nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: CxrcaeVggCae) -> dict[str, torch.Tensor]:
    """Any cxrcae weights -> this model's names; refuses files that lack (or mis-shape) an encoder tensor."""
    if any(k.startswith("encoder.") for k in state_dict):  # autoencoder / classifier checkpoint
        state_dict = {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    else:
        state_dict = {k: v for k, v in state_dict.items() if k.startswith(("stages.", "head.fc."))}
    own = model.state_dict()
    missing = [k for k in own if k.startswith("stages.") and k not in state_dict]
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or wrong:
        detail = (
            f"missing {', '.join(missing[:4])}" if missing else f"shape mismatch in {', '.join(wrong[:4])}"
        )
        raise CheckpointError(f"weights are not a cxrcae encoder ({detail})")
    if not any(k.startswith("head.fc.") for k in own):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    return state_dict


def _clean_pretrained_cfg(cfg: Any) -> Any:
    """A cxrcae config.json read by timm's ``hf-hub:``/``local-dir:`` loaders -> a PretrainedCfg dict."""
    if not isinstance(cfg, dict):
        return cfg
    names = {f.name for f in dataclasses.fields(PretrainedCfg)}
    out = {k: v for k, v in cfg.items() if k in names}
    if "input_size" not in cfg and cfg.get("image_size"):
        size = int(cfg["image_size"])
        out["input_size"] = (int(cfg.get("in_chans", 3)), size, size)
    for key in ("mean", "std", "input_size"):
        if key in out:
            out[key] = tuple(out[key])
    out.update(
        architecture="cxrcae_vgg_cae",
        num_classes=0,
        classifier="head.fc",
        first_conv="stages.conv1",
        hf_hub_filename="model.safetensors",
    )
    out.setdefault("interpolation", INTERPOLATION)
    out.setdefault("crop_pct", 1.0)
    return out


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "fixed_input_size": False,
        "min_input_size": (3, 32, 32),
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": INTERPOLATION,
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "first_conv": "stages.conv1",
        "classifier": "head.fc",
        "hf_hub_filename": "model.safetensors",
        "paper_ids": "doi:10.18280/ria.350509",
        "paper_name": "Unsupervised Convolutional Filter Learning for COVID-19 Classification",
        **kwargs,
    }


def _bundled_cfg() -> dict[str, Any]:
    """``pretrained=True`` loads the encoder shipped inside the package (offline), at its training size."""
    folder = bundled.bundled_encoder()
    if folder is None:
        return _cfg()
    size = int(json.loads((folder / "config.json").read_text()).get("image_size", 224))
    return _cfg(
        file=str(folder / "model.safetensors"),
        input_size=(3, size, size),
        pool_size=(size // 32, size // 32),
        license="other",  # trained on research-use-only data: see the model card
    )


default_cfgs = generate_default_cfgs({"cxrcae_vgg_cae": _bundled_cfg()})


@register_model
def cxrcae_vgg_cae(pretrained: bool = False, **kwargs: Any) -> CxrcaeVggCae:
    """VGG-like 6-conv chest X-ray encoder of Mahalingam & Pandraju (2021); 3.95M parameters."""
    if "pretrained_cfg" in kwargs:
        kwargs["pretrained_cfg"] = _clean_pretrained_cfg(kwargs["pretrained_cfg"])
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if "file" not in overlay and any(overlay.get(k) for k in ("hf_hub_id", "url", "state_dict")):
        # another source was asked for: the bundled file (timm loads 'file' first) must not win
        kwargs["pretrained_cfg_overlay"] = {**overlay, "file": None}
    return build_model_with_cfg(
        CxrcaeVggCae,
        "cxrcae_vgg_cae",
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(len(_FEATURES)))),
        **kwargs,
    )
