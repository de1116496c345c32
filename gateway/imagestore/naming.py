"""Content addresses for images: ``<sha256 hex>.<ext>``, the extension read from the magic bytes."""

from __future__ import annotations

import hashlib

MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "bin": "application/octet-stream"}


def image_extension(data: bytes) -> str:
    """``png``, ``jpg`` or ``webp`` from the file's first bytes; ``bin`` for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"


def content_key(data: bytes) -> str:
    """The object key of ``data``: the same bytes always get the same key."""
    return f"{hashlib.sha256(data).hexdigest()}.{image_extension(data)}"


def media_type(key: str) -> str:
    """The Content-Type stored with an object, from its key's extension."""
    return MEDIA_TYPES.get(key.rsplit(".", 1)[-1], MEDIA_TYPES["bin"])
