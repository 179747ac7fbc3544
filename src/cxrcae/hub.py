"""Hugging Face Hub transfer: push a checkpoint folder as one commit, pull one strictly and safetensors-only.

The Hub repo holds exactly the local checkpoint layout (``model.safetensors``, ``config.json``,
``README.md``), so a Hub id works wherever a folder does. Settings are read at call time, not when
huggingface_hub was imported: ``HF_ENDPOINT``, ``HF_HUB_CACHE``/``HF_HOME`` and ``HF_HUB_OFFLINE=1``
(served from the cache, no network) take effect even if they change inside one process. The token comes
from the caller, ``HF_TOKEN`` or the saved login and is only ever handed to huggingface_hub: never
printed, logged or written to a file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrcae.errors import CheckpointError, CxrcaeError, DownloadError
from cxrcae.pretrained import PretrainedEncoder, load_encoder
from cxrcae.progress import ProgressFn, no_progress

CARD_NAME = "README.md"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HUB_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)
DEFAULT_ENDPOINT = "https://huggingface.co"
# Config keys that describe a whole autoencoder/classifier, not the encoder taken out of it.
_NOT_ENCODER_KEYS = (
    "kind",
    "head",
    "class_names",
    "temperature",
    "num_parameters",
    "weights_sha256",
    "versions",
)

__all__ = [
    "PretrainedEncoder",
    "PullResult",
    "PushError",
    "PushResult",
    "download_checkpoint",
    "load_encoder",
    "parse_repo_ref",
    "pull",
    "push_checkpoint",
]


class PushError(CxrcaeError):
    """The upload was refused or failed (authentication, permissions, network)."""


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    kind: str
    files: list[str] = field(default_factory=list)


@dataclass
class PullResult:
    repo_id: str
    revision: str | None
    commit: str | None
    folder: Path
    kind: str
    files: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


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
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return os.path.join(home, "hub")


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


@contextmanager
def hub_progress_bars(enabled: bool) -> Iterator[None]:
    """Turn huggingface_hub's own byte-level tqdm bars off (e.g. for --quiet/--json), restoring them after."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _is_http_error(exc: BaseException) -> bool:
    try:
        import httpx2 as httpx  # what huggingface_hub >= 1.0 uses
    except ImportError:  # pragma: no cover - older stacks
        try:
            import httpx
        except ImportError:
            return False
    return isinstance(exc, httpx.HTTPError)


# ----------------------------------------------------------------------------------------------- pull


def download_checkpoint(ref: str, *, token: str | None = None) -> Path:
    """Download (or find in the cache) a Hub checkpoint; returns its snapshot folder.

    Only ``config.json``, ``model.safetensors`` and ``README.md`` are fetched, all from the same commit; a
    repo without safetensors weights is refused, whatever else it holds. Keys are checked later by the loader.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = parse_repo_ref(ref)
    offline = hub_offline()
    common: dict[str, Any] = {
        "repo_id": repo_id,
        "cache_dir": hub_cache_dir(),
        "local_files_only": offline,
        "token": token,
    }
    if not offline:
        common["endpoint"] = hub_endpoint()

    def fetch(filename: str, rev: str | None) -> Path:
        return Path(hf_hub_download(filename=filename, revision=rev, **common))

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        try:
            config_path = fetch(CONFIG_NAME, revision)
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
            fetch(WEIGHTS_NAME, commit)
        except EntryNotFoundError:
            raise CheckpointError(
                f"{where}: no {WEIGHTS_NAME} in the repo{_other_weights_hint(repo_id, commit, token)}; "
                "cxrcae only loads safetensors weights (pickled .bin/.pt/.ckpt files are never loaded)"
            ) from None
        try:
            fetch(CARD_NAME, commit)
        except EntryNotFoundError:
            pass  # a card is welcome, not required
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
        raise DownloadError(f"{where}: Hub request failed ({_first_line(exc)})") from None
    except (OSError, ValueError) as exc:
        raise DownloadError(f"{where}: download failed ({_first_line(exc)})") from None
    except Exception as exc:
        if _is_http_error(exc):
            raise DownloadError(f"{where}: cannot reach {hub_endpoint()} ({_first_line(exc)})") from None
        raise
    return folder


def _other_weights_hint(repo_id: str, revision: str, token: str | None) -> str:
    """Name the non-safetensors weights the repo does have, when the listing is reachable."""
    try:
        from huggingface_hub import HfApi

        files = HfApi(endpoint=hub_endpoint(), token=token).list_repo_files(repo_id, revision=revision)
    except Exception:  # only a hint: a failed listing must not hide the real message
        return ""
    weights = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".h5", ".pkl"))]
    return f" (it has {', '.join(weights[:5])})" if weights else ""


def pull(ref: str, out: str | Path | None = None, *, token: str | None = None) -> PullResult:
    """Fetch ``user/repo[@rev]`` and check it loads strictly; with ``out``, copy the files there."""
    from cxrcae.models.checkpoint import atomic_write_bytes, load_checkpoint

    repo_id, revision = parse_repo_ref(ref)
    folder = download_checkpoint(ref, token=token)
    commit = download_commit(folder)
    files = [name for name in HUB_FILES if (folder / name).is_file()]
    if out is not None:
        dest = Path(out).expanduser()
        if dest.exists() and not dest.is_dir():
            raise CxrcaeError(f"{dest}: exists and is not a folder")
        # weights first, config last (as save_checkpoint does): a half-copied folder never looks complete
        for name in (WEIGHTS_NAME, CARD_NAME, CONFIG_NAME):
            if name in files:
                atomic_write_bytes(dest / name, (folder / name).read_bytes())
        folder = dest
    _, config = load_checkpoint(folder)  # strict: refuses mismatched keys or a sha256 mismatch
    return PullResult(
        repo_id=repo_id,
        revision=revision,
        commit=commit,
        folder=folder,
        kind=str(config.get("kind")),
        files=files,
        config=config,
    )


def download_commit(folder: Path) -> str | None:
    """The commit a cache snapshot folder belongs to (its name), if ``folder`` is one."""
    return folder.name if folder.parent.name == "snapshots" else None


# ----------------------------------------------------------------------------------------------- push


def resolve_token(token: str | None) -> str:
    """``token``, else HF_TOKEN, else the saved login; a missing token is a clear error (never echoed)."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    saved = get_token()
    if not saved:
        raise PushError("no Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`")
    return saved


def encoder_only_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json for the encoder taken out of a checkpoint: its input contract and provenance kept."""
    out = {k: v for k, v in config.items() if k not in _NOT_ENCODER_KEYS}
    out["kind"] = "encoder"
    if config.get("kind") != "encoder":
        out["extracted_from"] = {"kind": config.get("kind"), "weights_sha256": config.get("weights_sha256")}
    return out


def find_metrics(model_dir: Path) -> Path | None:
    """The evaluation results to put on the card: metrics.json next to the weights, else eval-test/."""
    for candidate in (model_dir / "metrics.json", model_dir / "eval-test" / "metrics.json"):
        if candidate.is_file():
            return candidate
    return None


def _read_metrics(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CxrcaeError(f"{path}: unreadable metrics file ({_first_line(exc)})") from None


def prepare_upload(
    model_dir: str | Path,
    staging: Path,
    *,
    encoder_only: bool = False,
    repo_id: str | None = None,
    metrics: str | Path | None = None,
    card: str | Path | None = None,
) -> dict[str, Any]:
    """Write the folder that becomes the commit (weights, config, card) into ``staging``; returns its config.

    The model is loaded strictly first, so a broken or mismatched folder is refused before anything is sent.
    """
    from cxrcae.card import build_card
    from cxrcae.models import CAEEncoder
    from cxrcae.models.checkpoint import (
        atomic_write_text,
        encoder_state,
        load_checkpoint,
        load_state_strict,
        resolve_checkpoint,
        save_checkpoint,
    )

    src = resolve_checkpoint(model_dir)
    _, config = load_checkpoint(src)
    if encoder_only:
        state, _ = encoder_state(src)
        encoder = CAEEncoder(int(config.get("in_chans", 3)))
        load_state_strict(encoder, state, f"{src} (encoder)")
        config = json.loads(
            (save_checkpoint(encoder, staging, encoder_only_config(config)) / CONFIG_NAME).read_text()
        )
    else:
        shutil.copyfile(src / WEIGHTS_NAME, staging / WEIGHTS_NAME)  # byte for byte: the sha256 still matches
        shutil.copyfile(src / CONFIG_NAME, staging / CONFIG_NAME)
    if card is not None:
        text = Path(card).read_text("utf-8")
    else:
        # a classifier's test metrics do not describe its encoder alone
        metrics_path = None if encoder_only else Path(metrics) if metrics is not None else find_metrics(src)
        text = build_card(config, _read_metrics(metrics_path), repo_id=repo_id)
    atomic_write_text(staging / CARD_NAME, text)
    return config


def push_checkpoint(
    model_dir: str | Path,
    repo_id: str,
    *,
    encoder_only: bool = False,
    private: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    metrics: str | Path | None = None,
    card: str | Path | None = None,
    progress: ProgressFn = no_progress,
) -> PushResult:
    """Create the repo if needed and upload weights + config + card as ONE commit to branch ``revision``."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    repo_id, at_revision = parse_repo_ref(repo_id)
    if at_revision and revision and at_revision != revision:
        raise CxrcaeError(f"two different revisions given: {at_revision!r} and {revision!r}")
    branch = revision or at_revision or "main"
    if hub_offline():
        raise PushError("HF_HUB_OFFLINE=1 is set: cannot push")
    api = HfApi(endpoint=hub_endpoint(), token=resolve_token(token))
    steps = 4
    with tempfile.TemporaryDirectory(prefix="cxrcae-push-") as tmp:
        staging = Path(tmp)
        progress("push", 0, steps, "checking the checkpoint")
        config = prepare_upload(
            model_dir, staging, encoder_only=encoder_only, repo_id=repo_id, metrics=metrics, card=card
        )
        kind = str(config["kind"])
        files = [name for name in HUB_FILES if (staging / name).is_file()]
        message = commit_message or f"Upload cxrcae {kind} ({config.get('num_parameters', 0):,} parameters)"
        try:
            progress("push", 1, steps, "creating the repo")
            api.create_repo(repo_id, private=private, exist_ok=True)
            if branch != "main":
                progress("push", 2, steps, f"creating branch {branch}")
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            progress("push", 3, steps, "uploading")
            operations = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(staging / n)) for n in files]
            info = api.create_commit(repo_id, operations, commit_message=message, revision=branch)
        except RepositoryNotFoundError:
            raise PushError(f"{repo_id}: repository not found or no write access with this token") from None
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise PushError(
                    f"{repo_id}: not allowed to write (HTTP {status}); does the token have write access?"
                ) from None
            raise PushError(f"{repo_id}: upload failed ({_first_line(exc)})") from None
        except (OSError, ValueError) as exc:
            raise PushError(f"{repo_id}: upload failed ({_first_line(exc)})") from None
        except Exception as exc:
            if _is_http_error(exc):
                raise PushError(f"cannot reach {hub_endpoint()} ({_first_line(exc)})") from None
            raise
        progress("push", steps, steps, "done")
    return PushResult(
        repo_id=repo_id,
        revision=branch,
        commit_oid=str(info.oid),
        commit_url=str(info.commit_url),
        kind=kind,
        files=files,
    )
