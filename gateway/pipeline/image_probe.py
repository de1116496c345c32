"""What an uploaded image is, from its first bytes: PNG, JPEG or WebP by magic bytes, and its size.

Only headers are read (PNG IHDR, JPEG SOF segment, WebP VP8/VP8L/VP8X chunk), never pixels:
the declared content type and the filename are not trusted, and nothing is decoded.
"""

from __future__ import annotations

PROBE_BYTES = 1 << 16  # enough for the SOF of a JPEG with ordinary EXIF/ICC segments before it
_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"
# SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_format(head: bytes) -> str | None:
    """``png``, ``jpeg`` or ``webp`` by the magic bytes; None for anything else."""
    if head.startswith(_PNG):
        return "png"
    if head.startswith(_JPEG):
        return "jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def image_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) read from the header; None when it is not in ``head`` or not readable."""
    fmt = image_format(head)
    if fmt == "png":
        if head[12:16] != b"IHDR" or len(head) < 24:
            return None
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if fmt == "jpeg":
        return _jpeg_size(head)
    if fmt == "webp":
        return _webp_size(head)
    return None


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        length = int.from_bytes(head[i + 2:i + 4], "big")
        if marker in _JPEG_SOF:
            if i + 9 > len(head):
                return None
            return int.from_bytes(head[i + 7:i + 9], "big"), int.from_bytes(head[i + 5:i + 7], "big")
        if marker == 0xDA or length < 2:  # scan data before any frame header: give up
            return None
        i += 2 + length
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(head) >= 30:
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None
