"""Kaggle-hosted sources through ``kagglehub`` (optional: ``pip install 'cxrcae[kaggle]'``).

kagglehub keeps its own cache, so a second fetch downloads nothing. It is imported only when a Kaggle source
is fetched without a mirror; both a missing package and missing credentials become one clear message.
"""

from __future__ import annotations

import os
from pathlib import Path

from cxrcae.errors import DownloadError

_TOKEN_HELP = (
    "create an API token at https://www.kaggle.com/settings (API -> Create New Token) and save it as "
    "~/.kaggle/kaggle.json, or set KAGGLE_USERNAME and KAGGLE_KEY"
)


def has_credentials() -> bool:
    """Whether kagglehub can find credentials (env vars or kaggle.json); public data may work without."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    if os.environ.get("KAGGLE_API_TOKEN"):
        return True
    config = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config / "kaggle.json").is_file() or (config / "access_token").is_file()


def kaggle_download(handle: str, *, force: bool = False) -> Path:
    """Download (or reuse) a Kaggle dataset; returns the folder kagglehub unpacked it to."""
    try:
        import kagglehub
    except ImportError:
        raise DownloadError(
            f"{handle} is hosted on Kaggle: install the optional dependency with "
            "pip install 'cxrcae[kaggle]' (or point --mirror / CXRCAE_MIRROR at a mirror)"
        ) from None
    try:
        path = kagglehub.dataset_download(handle, force_download=force)
    except Exception as exc:  # kagglehub raises its own and requests' error types
        text = f"{type(exc).__name__}: {exc}".strip()
        hint = "" if has_credentials() else f"; no Kaggle credentials found: {_TOKEN_HELP}"
        if any(code in text for code in ("401", "403", "Unauthorized", "Forbidden")) and not hint:
            hint = "; Kaggle refused the credentials (check them, and accept the dataset's terms on its page)"
        raise DownloadError(f"Kaggle download of {handle} failed ({text}){hint}") from None
    return Path(path)
