"""One error type for everything a user can cause; the CLI turns it into a one-line message."""

from __future__ import annotations

from pathlib import Path

EXIT_SOME_FAILED = 3
"""Exit code of batch commands (predict, embed, reconstruct) when some files could not be read: the others
still have their rows, and each unreadable file has an error row with its reason."""


class CxrcaeError(Exception):
    """A failure the user can act on (bad file, bad option, missing data); never a bug."""

    exit_code = 1


class OptionError(CxrcaeError):
    """An option's value is malformed (``--fractions 0.5,x``): a usage error, exit 2 like Typer's own."""

    exit_code = 2


class ImageLoadError(CxrcaeError):
    """A single file could not be turned into an image; batch commands report it and go on."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DataError(CxrcaeError):
    """A dataset, manifest or splits file is malformed or unusable."""


class CheckpointError(CxrcaeError):
    """A checkpoint folder or Hub repo is missing, incompatible or has mismatched weights."""


class DownloadError(CxrcaeError):
    """A download failed, was cut, or did not match its checksum."""


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` on Python 3.11+, the same ``__notes__`` list on 3.10 (the CLI reads it)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # pragma: no cover - Python 3.10
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]
