"""What an upload may be: bounded in size, recognised by its content, and never left behind on disk.

The body is read into memory chunk by chunk and refused (413) as soon as it passes the limit, or before a
byte is read when its declared Content-Length already does. A multipart form is parsed in memory
(python-multipart, with its spill-to-disk threshold above the limit so nothing is spooled elsewhere); a raw
body (``curl --data-binary @scan.dcm``) is taken as is. The format is decided by the first bytes, never by the
file name or the declared content type, so a text file called ``scan.png`` answers 415. For decoding, the
bytes are copied into a fresh private folder (mode 0700, file 0600, under ``$TMPDIR``) that is removed as soon
as the answer is ready; the client's file name is not used anywhere.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from python_multipart import create_form_parser
from python_multipart.exceptions import FormParserError

#: Decodable formats by their magic bytes, and the extension the private copy gets (what ``load_xray`` reads).
FORMATS: dict[str, str] = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "DICOM": ".dcm"}
SNIFF_BYTES = 132
DEFAULT_MAX_UPLOAD = 64 * 1024 * 1024
"""64 MiB: a large uncompressed DICOM radiograph (3000 x 3000 x 16 bit is 18 MB) with room to spare."""
FORM_SLACK = 64 * 1024
"""Multipart framing (boundaries, part headers, other small fields) allowed on top of the file limit."""
FILE_FIELDS = ("file", "image", "upload")


class UploadError(Exception):
    """An upload refused with an HTTP status and a one-line reason for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def sniff_format(head: bytes) -> str | None:
    """The format by magic bytes: "DICOM" (Part 10: ``DICM`` after the 128-byte preamble), "PNG", "JPEG",
    "TIFF", or None. DICOM comes first: its preamble may itself hold a TIFF header (dual-format files)."""
    if len(head) >= SNIFF_BYTES and head[128:132] == b"DICM":
        return "DICOM"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic and BigTIFF
        return "TIFF"
    return None


def require_format(data: bytes) -> str:
    """The sniffed format of ``data``, or a 415 saying what is accepted."""
    fmt = sniff_format(data[:SNIFF_BYTES])
    if fmt is None:
        raise UploadError(
            415,
            "not a PNG, JPEG, TIFF or DICOM image (the content was checked, not the file name or type)",
        )
    return fmt


def too_large(limit: int) -> UploadError:
    return UploadError(413, f"upload too large: the limit is {human_size(limit)}")


def check_declared_length(headers: Mapping[str, str], limit: int) -> None:
    """Refuse before reading when Content-Length already says the body cannot fit."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + FORM_SLACK:
        raise too_large(limit)


async def read_body(chunks: Any, limit: int) -> bytes:
    """The request body from an async iterator of chunks, stopped with 413 once it passes the limit."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit + FORM_SLACK:
            raise too_large(limit)
    return bytes(body)


def extract_upload(content_type: str | None, body: bytes, limit: int) -> bytes:
    """The uploaded file: the ``file`` part of a multipart form (or its only file part), else the raw body."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    data = _form_file(content_type or "", body, limit) if kind == "multipart/form-data" else body
    if not data:
        raise UploadError(400, "empty upload: send the image as the 'file' field of a multipart form")
    if len(data) > limit:
        raise too_large(limit)
    return data


def _form_file(content_type: str, body: bytes, limit: int) -> bytes:
    parts: dict[str, bytes] = {}
    files: list[bytes] = []

    def on_file(file: Any) -> None:
        data = file.file_object.getvalue()
        files.append(data)
        parts.setdefault((file.field_name or b"").decode("latin-1"), data)

    def on_field(field: Any) -> None:
        parts.setdefault((field.field_name or b"").decode("latin-1"), field.value or b"")

    # spill threshold above the body limit: every part stays in memory, nothing goes to a temp file
    config = {"MAX_MEMORY_FILE_SIZE": limit + FORM_SLACK + 1, "UPLOAD_KEEP_FILENAME": False}
    try:
        parser = create_form_parser(
            {"Content-Type": content_type.encode("latin-1")}, on_field, on_file, config
        )
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError, UnicodeEncodeError) as exc:
        raise UploadError(400, f"malformed multipart form ({str(exc).splitlines()[0][:200]})") from None
    for name in FILE_FIELDS:
        if name in parts:
            return parts[name]
    if len(files) == 1:
        return files[0]
    raise UploadError(400, "no image in the form: send it as the 'file' field")


@contextmanager
def private_copy(data: bytes, fmt: str) -> Iterator[Path]:
    """``data`` as ``upload.<ext>`` in a new 0700 folder, removed (with the file) when the block ends.

    A scratch copy the decoders can open by path, not a result: written directly (no atomic rename or fsync,
    which would only slow every request), readable by this user alone, gone before the answer is sent.
    """
    with tempfile.TemporaryDirectory(prefix="cxrcae-serve-") as folder:
        path = Path(folder) / f"upload{FORMATS[fmt]}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path


def human_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"
