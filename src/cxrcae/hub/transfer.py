"""Hugging Face Hub transfer: push a checkpoint folder as one commit, pull one strictly and safetensors-only.

The Hub repo holds exactly the local checkpoint layout (``model.safetensors``, ``config.json``,
``README.md``), so a Hub id works wherever a folder does (``cxrcae.hub.resolve``). Hub settings are
huggingface_hub's own (``huggingface_hub.constants``). The token comes
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

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from cxrcae._atomic import atomic_write_many, atomic_write_text
from cxrcae.errors import CxrcaeError
from cxrcae.hub.card import build_card
from cxrcae.hub.resolve import (
    CARD_NAME,
    CONFIG_NAME,
    HUB_FILES,
    WEIGHTS_NAME,
    download_checkpoint,
    download_commit,
    encoder_state,
    first_line,
    hub_endpoint,
    hub_offline,
    is_http_error,
    load_checkpoint,
    parse_repo_ref,
    resolve_checkpoint,
)
from cxrcae.models.cae import CAEEncoder
from cxrcae.models.checkpoint import GUARD_NAME, load_state_strict, read_guard, save_checkpoint
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.tasks import task_name, task_of

# Config keys that describe a whole autoencoder/classifier, not the encoder taken out of it.
_NOT_ENCODER_KEYS = (
    "task",
    "kind",
    "head",
    "class_names",
    "temperature",
    "num_parameters",
    "weights_sha256",
    "versions",
    "ood",
)


class PushError(CxrcaeError):
    """The upload was refused or failed (authentication, permissions, network)."""


@dataclass
class PushResult:
    """What ``push_checkpoint`` committed: the repo, branch, commit and the files it uploaded."""

    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    kind: str
    files: list[str] = field(default_factory=list)


@dataclass
class PullResult:
    """What ``pull`` fetched: the repo, revision and commit, the local folder, its files and config.json."""

    repo_id: str
    revision: str | None
    commit: str | None
    folder: Path
    kind: str
    files: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    """The checkpoint's task (None for a bare encoder); ``summary`` is what its card says it does."""
    summary: str = ""


@contextmanager
def hub_progress_bars(enabled: bool) -> Iterator[None]:
    """Turn huggingface_hub's own byte-level tqdm bars off (e.g. for --quiet/--json), restoring them after."""
    was_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


# ----------------------------------------------------------------------------------------------- pull


def pull(ref: str, out: str | Path | None = None, *, token: str | None = None) -> PullResult:
    """Fetch ``user/repo[@rev]`` and check it loads strictly; with ``out``, copy the files there."""

    repo_id, revision = parse_repo_ref(ref)
    folder = download_checkpoint(ref, token=token)
    commit = download_commit(folder)
    files = [name for name in HUB_FILES if (folder / name).is_file()]
    _, config = load_checkpoint(folder)  # strict, bounded, before anything is copied out of the cache
    task = task_of(config) if task_name(config) is not None else None
    if out is not None:
        dest = Path(out).expanduser()
        if dest.exists() and not dest.is_dir():
            raise CxrcaeError(f"{dest}: exists and is not a folder")
        # all written before any is renamed, config last (as save_checkpoint does): a failed copy leaves
        # what was in ``dest`` before, and a copy never looks complete before it is
        names = [name for name in (WEIGHTS_NAME, GUARD_NAME, CARD_NAME, CONFIG_NAME) if name in files]
        atomic_write_many({dest / name: (folder / name).read_bytes() for name in names})
        folder = dest
    return PullResult(
        repo_id=repo_id,
        revision=revision,
        commit=commit,
        folder=folder,
        kind=str(config.get("kind")),
        files=files,
        config=config,
        task=task.name if task is not None else None,
        summary=task.card_summary(config) if task is not None else "a bare encoder (features only)",
    )


# ----------------------------------------------------------------------------------------------- push


def resolve_token(token: str | None) -> str:
    """``token``, else HF_TOKEN, else the saved login; a missing token is a clear error (never echoed)."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    saved = get_token()
    if not saved:
        raise PushError("no Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`")
    return saved


def encoder_only_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json for the encoder taken out of a checkpoint: its input contract and provenance kept."""
    out = {k: v for k, v in config.items() if k not in _NOT_ENCODER_KEYS}
    out["kind"] = "encoder"
    if config.get("kind") != "encoder":
        out["extracted_from"] = {
            "kind": config.get("kind"),
            **({"task": config["task"]} if config.get("task") else {}),
            "weights_sha256": config.get("weights_sha256"),
        }
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
        raise CxrcaeError(f"{path}: unreadable metrics file ({first_line(exc)})") from None


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
        if read_guard(src, config) is not None:  # the OOD guard travels with its classifier, checked first
            shutil.copyfile(src / GUARD_NAME, staging / GUARD_NAME)
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
            raise PushError(f"{repo_id}: upload failed ({first_line(exc)})") from None
        except (OSError, ValueError) as exc:
            raise PushError(f"{repo_id}: upload failed ({first_line(exc)})") from None
        except Exception as exc:
            if is_http_error(exc):
                raise PushError(f"cannot reach {hub_endpoint()} ({first_line(exc)})") from None
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
