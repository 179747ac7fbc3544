"""Where a checkpoint lives: a local folder or a Hub id ``user/repo[@revision]``, like ``from_pretrained``.

Everything that accepts a model (predict, evaluate, embed, finetune's ``--encoder``, ``load_model``,
``load_encoder``) goes through ``resolve_checkpoint``: a folder is used as is, a Hub id is downloaded into
the Hugging Face cache (config, safetensors weights and card only, all from one commit) and the snapshot
folder is used. A Hub repo is untrusted input: each file's size, as the Hub declares it, is checked before
it is downloaded (config.json and the card up to ``CONFIG_MAX_BYTES``, the weights up to what the model
that config.json describes holds), config.json is validated before the weights are fetched, and a repo
that has only pickled weights is refused without downloading them. Hub settings (``HF_ENDPOINT``,
``HF_HUB_CACHE``/``HF_HOME``, ``HF_HUB_OFFLINE``) are huggingface_hub's own, read from
``huggingface_hub.constants``; nothing here re-derives them.

Where an encoder is wanted (``load_encoder``, ``encoder_state``, finetune's ``--encoder``), ``bundled`` names
the encoder shipped in the package (``resolve_encoder_checkpoint``); ``cxrcae.hub.encoders`` adds ``random``
and timm models on top.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from torch import nn

from cxrcae import bundled
from cxrcae.errors import CheckpointError, CxrcaeError, DownloadError
from cxrcae.models.checkpoint import (
    CARD_NAME,
    CONFIG_MAX_BYTES,
    CONFIG_NAME,
    GUARD_BLOCK,
    GUARD_NAME,
    WEIGHTS_NAME,
    encoder_state_of_folder,
    expected_tensors,
    guard_tensors,
    load_folder,
    load_state_strict,
    max_weights_bytes,
    read_config,
)
from cxrcae.models.encoder import PretrainedEncoder
from cxrcae.tasks import Task, build_model, task_name, task_of

try:  # the HTTP client huggingface_hub >= 1.0 uses
    import httpx2 as _httpx
except ImportError:  # pragma: no cover - older stacks
    try:
        import httpx as _httpx
    except ImportError:
        _httpx = None

HUB_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, GUARD_NAME)  # the guard only where config.json has one


def parse_repo_ref(ref: str) -> tuple[str, str | None]:
    """``user/repo[@revision]`` -> (repo_id, revision or None); anything else is a clear error."""
    text = str(ref).strip()
    repo_id, _, revision = text.partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo_id):
        raise CheckpointError(f"{ref!r} is not a Hub id; expected user/repo or user/repo@revision")
    if "@" in text and not revision:
        raise CheckpointError(f"{ref!r}: empty revision after '@'")
    return repo_id, revision or None


# ----------------------------------------------------------------------------------------------- settings


def hub_endpoint() -> str:
    return constants.ENDPOINT.rstrip("/")


def hub_offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    return Path(constants.HF_HUB_CACHE).expanduser()


def in_hub_cache(path: str | Path) -> bool:
    """Whether ``path`` is inside the Hugging Face cache (compared as resolved paths, never by name).

    Files there are shared, read-only snapshots (symlinks into ``blobs/``): nothing is written through them.
    """
    try:
        return Path(path).expanduser().resolve().is_relative_to(hub_cache_dir().resolve())
    except OSError:
        return False


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def is_http_error(exc: BaseException) -> bool:
    return _httpx is not None and isinstance(exc, _httpx.HTTPError)


# ----------------------------------------------------------------------------------------------- download


def download_checkpoint(ref: str, *, token: str | None = None) -> Path:
    """Download (or find in the cache) a Hub checkpoint; returns its snapshot folder.

    Only ``config.json``, ``model.safetensors``, ``README.md`` and (when config.json declares one) the
    ``ood.safetensors`` guard are fetched, all from the same commit; a repo without safetensors weights is
    refused, whatever else it holds. Keys are checked later by the loader.
    """
    repo_id, revision = parse_repo_ref(ref)
    offline = hub_offline()
    common: dict[str, Any] = {"repo_id": repo_id, "local_files_only": offline, "token": token}

    def fetch(filename: str, rev: str | None, limit: int) -> Path:
        if not offline:  # the declared size first: nothing larger than ``limit`` is downloaded
            url = hf_hub_url(repo_id, filename, revision=rev, endpoint=hub_endpoint())
            size = get_hf_file_metadata(url, token=token).size
            if size is not None and size > limit:
                raise CheckpointError(
                    f"{where}: {filename} is {size:,} bytes, more than the {limit:,} a cxrcae checkpoint "
                    "needs; refused"
                )
        return Path(hf_hub_download(filename=filename, revision=rev, **common))

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        try:
            config_path = fetch(CONFIG_NAME, revision, CONFIG_MAX_BYTES)
        except (LocalEntryNotFoundError, OfflineModeIsEnabled):
            if offline:
                raise DownloadError(
                    f"{where}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                    "pull it once while online"
                ) from None
            raise
        except EntryNotFoundError:
            raise CheckpointError(f"{where}: no {CONFIG_NAME} in the repo; not a cxrcae checkpoint") from None
        folder = config_path.parent
        commit = folder.name  # snapshots/<commit>/: pin the other files to the very same commit
        try:
            fetch(WEIGHTS_NAME, commit, max_weights_bytes(expected_tensors(read_config(folder), build_model)))
        except EntryNotFoundError:
            raise CheckpointError(
                f"{where}: no {WEIGHTS_NAME} in the repo{_other_weights_hint(repo_id, commit, token)}; "
                "cxrcae only loads safetensors weights (pickled .bin/.pt/.ckpt files are never loaded)"
            ) from None
        try:
            fetch(CARD_NAME, commit, CONFIG_MAX_BYTES)
        except EntryNotFoundError:
            pass  # a card is welcome, not required
        if GUARD_BLOCK in (config := read_config(folder)):  # its OOD guard (cxrcae.ood), checked on load
            try:
                fetch(GUARD_NAME, commit, max_weights_bytes(guard_tensors(config)))
            except EntryNotFoundError:
                pass  # predict then says the guard is missing and runs the other checks
    except (CxrcaeError, KeyboardInterrupt):
        raise
    except GatedRepoError:
        raise DownloadError(f"{where}: gated repo; accept its terms on the Hub and pass a token") from None
    except RepositoryNotFoundError:
        raise DownloadError(
            f"{where}: repository not found on {hub_endpoint()} (private? pass --token or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise DownloadError(f"{where}: revision {revision!r} not found") from None
    except HfHubHTTPError as exc:
        raise DownloadError(f"{where}: Hub request failed ({first_line(exc)})") from None
    except (OSError, ValueError) as exc:
        raise DownloadError(f"{where}: download failed ({first_line(exc)})") from None
    except Exception as exc:
        if is_http_error(exc):
            raise DownloadError(f"{where}: cannot reach {hub_endpoint()} ({first_line(exc)})") from None
        raise
    return folder


def _other_weights_hint(repo_id: str, revision: str, token: str | None) -> str:
    """Name the non-safetensors weights the repo does have, when the listing is reachable."""
    try:
        files = HfApi(endpoint=hub_endpoint(), token=token).list_repo_files(repo_id, revision=revision)
    except Exception:  # only a hint: a failed listing must not hide the real message
        return ""
    weights = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".h5", ".pkl"))]
    return f" (it has {', '.join(weights[:5])})" if weights else ""


def download_commit(folder: Path) -> str | None:
    """The commit a cache snapshot folder belongs to (its name), if ``folder`` is one."""
    return folder.name if folder.parent.name == "snapshots" else None


# ----------------------------------------------------------------------------------------------- loading


def resolve_checkpoint(ref: str | Path) -> Path:
    """A local folder, or a Hugging Face Hub id ``user/repo[@revision]`` downloaded into the HF cache."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.name in (WEIGHTS_NAME, CONFIG_NAME):
        return path.parent
    text = str(ref)
    if not path.exists() and _looks_like_hub_id(text):
        return download_checkpoint(text)
    raise CheckpointError(f"{ref}: no such checkpoint folder (expected {WEIGHTS_NAME} + {CONFIG_NAME})")


def _looks_like_hub_id(text: str) -> bool:
    repo = text.split("@", 1)[0]
    parts = repo.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


BUNDLED_ENCODER = "bundled"
"""The encoder name that means the one shipped in the package (unless a folder of that name exists)."""


def resolve_encoder_checkpoint(ref: str | Path) -> Path:
    """``resolve_checkpoint`` for a model whose encoder is wanted: ``bundled`` names the shipped encoder."""
    if str(ref) == BUNDLED_ENCODER and not Path(ref).exists():
        return bundled.require(bundled.bundled_encoder(), "encoder", "pass a checkpoint folder or Hub id")
    return resolve_checkpoint(ref)


def load_checkpoint(ref: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from config.json and load its weights strictly: (model in eval mode, config).

    The model is its task's (``cxrcae.tasks``), whose own config fields are checked before any tensor is
    read; a bare encoder checkpoint loads as the encoder."""
    folder = resolve_checkpoint(ref)
    config = read_config(folder)
    if task_name(config, folder / CONFIG_NAME) is not None:
        task_of(config, folder / CONFIG_NAME)
    return load_folder(folder, build_model, device)


@dataclass
class LoadedModel:
    """A model resolved once (folder or Hub id -> folder -> config, task, network), so the commands and
    backends that use it never look it up again.

    ``folder`` is None for an in-memory model (``load_model``); ``net`` is None when it was loaded without
    weights because a backend session runs it instead (``session``: an onnxruntime runner, set by
    ``cxrcae.infer``). ``guard`` is the out-of-distribution screen once predict or serve has built it.
    """

    ref: str
    folder: Path | None
    config: dict[str, Any]
    task: Task
    net: nn.Module | None
    session: Any = None
    guard: Any = None

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def resize_mode(self) -> str:
        return str(self.config.get("resize_mode", "stretch"))

    @property
    def class_names(self) -> list[str]:
        return list(self.config.get("class_names") or [])

    @property
    def weights_sha256(self) -> str | None:
        return self.config.get("weights_sha256")

    def probabilities(self, outputs: torch.Tensor | Any) -> Any:
        """What users read from the network's raw outputs (``Task.probabilities``)."""
        return self.task.probabilities(outputs, self.config)

    def with_weights(self, device: str | torch.device = "cpu") -> LoadedModel:
        """This model with its network: itself when it has one, else its folder's weights loaded now."""
        if self.net is not None:
            return self
        net, _ = load_checkpoint(self.folder, device)
        net.cxrcae_config = self.config  # type: ignore[attr-defined]
        return replace(self, net=net)


def load(
    ref: str | Path,
    device: str | torch.device = "cpu",
    task: str | None = None,
    *,
    weights: bool = True,
) -> LoadedModel:
    """Resolve and load ``ref`` once; with ``task``, refuse a checkpoint of another task in one line.

    ``weights=False`` reads and checks config.json only (``net`` is None), for a backend that runs the
    model from another file (``cxrcae.infer.onnx``)."""
    folder = resolve_checkpoint(ref)
    if weights:
        net, config = load_checkpoint(folder, device)
    else:
        net, config = None, read_config(folder)
    name = task_name(config)
    if name is None:
        raise CheckpointError(f"{ref}: a bare encoder checkpoint has no task; fine-tune it first")
    if task is not None and name != task:
        raise CheckpointError(f"{ref}: a {name!r} model, but this needs a {task!r} model")
    if net is not None:
        net.cxrcae_config = config  # type: ignore[attr-defined]
    return LoadedModel(str(ref), folder, config, task_of(config, folder / CONFIG_NAME), net)


def as_loaded(model: Any, device: str | torch.device = "cpu", *, weights: bool = True) -> LoadedModel:
    """``model`` as a ``LoadedModel``: one already (returned as is), a network from ``load_model`` (its
    ``cxrcae_config`` read, moved to ``device`` in eval mode), or a folder / Hub id (``load``)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        config = getattr(model, "cxrcae_config", None)
        if not isinstance(config, dict):
            raise CheckpointError(
                "a model object needs its config: load it with cxrcae.load_model(...) or pass the folder"
            )
        if task_name(config) is None:
            raise CheckpointError("a bare encoder has no task; fine-tune it first")
        net = model.to(device).eval() if weights else model  # without weights: a backend copies it
        return LoadedModel("in-memory model", None, config, task_of(config), net)
    return load(model, device, weights=weights)


def load_model(ref: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model alone, its config attached as ``model.cxrcae_config``."""
    model, config = load_checkpoint(ref, device)
    model.cxrcae_config = config  # type: ignore[attr-defined]
    return model


def encoder_state(ref: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The encoder's tensors (keys without ``encoder.``) from any checkpoint kind, or ``bundled``."""
    return encoder_state_of_folder(resolve_encoder_checkpoint(ref), build_model)


def load_encoder(
    ref: str | Path | None = None, pooled: bool = False, device: str | torch.device = "cpu"
) -> PretrainedEncoder:
    """The encoder of any cxrcae checkpoint (folder or Hub id ``user/repo[@rev]``), strict, eval mode;
    without ``ref`` (or with ``"bundled"``), the X-ray-pretrained encoder shipped with the package."""
    if ref is None:
        ref = BUNDLED_ENCODER
    state, config = encoder_state(ref)
    encoder = PretrainedEncoder(config, pooled=pooled)
    load_state_strict(encoder, state, f"{ref} (encoder)")
    return encoder.to(device).eval()
