"""Tiny, real, deterministic images for the fake upstream: PNG, JPEG and WebP without Pillow.

PNG pixels are a 16x16 checkerboard whose two colours come from the seed (a hash of
prompt and image index). JPEG and WebP reuse one fixed 16x16 picture (generated once
with Pillow, embedded below) and carry the seed in a comment segment / private chunk, so
their bytes still differ per prompt and index. Padding goes into the same kind of
ignorable block (PNG private ancillary chunk ``faKe``, JPEG ``COM`` segments, WebP
``FAKE`` chunk of an extended-format file), so a padded image stays decodable.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from functools import lru_cache

FORMATS = ("png", "jpeg", "webp")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
SIDE = 16

# 16x16 baseline JPEG (JFIF, quality 80) and lossless WebP (VP8L) of a four-colour quadrant picture.
_JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAYEBQYFBAYGBQYHBwYIChAKCgkJChQODwwQFxQYGBcUFhYaHSUfGhsjHBYWICwgIyYnKSop"
    "GR8tMC0oMCUoKSj/2wBDAQcHBwoIChMKChMoGhYaKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgo"
    "KCj/wAARCAAQABADASIAAhEBAxEB/8QAFQABAQAAAAAAAAAAAAAAAAAABwX/xAAUEAEAAAAAAAAAAAAAAAAAAAAA/8QAFQEBAQAAAAAA"
    "AAAAAAAAAAAABAX/xAAgEQAABAYDAAAAAAAAAAAAAAAABUFhBiIjMjNRUnFy/9oADAMBAAIRAxEAPwBlFSOKEUsJ7p9J24dG5Bgqck8u"
    "P//Z")
_WEBP_VP8L = base64.b64decode(
    "UklGRjgAAABXRUJQVlA4TCwAAAAvD8ADAB8gEEiCHnJEgQBhx3+MHKM1//GTQIAw22iSk5zkvc8gov8B+m31AQ==")[12:]
_JPEG_AFTER_APP0 = 4 + int.from_bytes(_JPEG[4:6], "big")  # SOI, then the JFIF APP0 segment
_COM_MAX = 65533  # a JPEG segment's data is at most 65535 bytes minus the 2-byte length
_FILLER = hashlib.shake_256(b"fake-upstream padding").digest(1 << 16)  # not compressible by deflate


def image_seed(prompt: str, index: int, variant: int = -1) -> bytes:
    """8 bytes that pick an image: one per prompt, image index and partial-image number (-1: final)."""
    return hashlib.blake2b(f"{index}\0{variant}\0{prompt}".encode(), digest_size=8).digest()


def _filler(size: int) -> bytes:
    if size <= 0:
        return b""
    return (_FILLER * (size // len(_FILLER) + 1))[:size]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(seed: bytes, pad_bytes: int = 0) -> bytes:
    """A 16x16 RGB PNG; with ``pad_bytes`` a private chunk brings it to about that size."""
    first, second = seed[0:3], seed[3:6]
    rows = []
    for y in range(SIDE):
        row = b"".join(first if (x // 4 + y // 4) % 2 == 0 else second for x in range(SIDE))
        rows.append(b"\0" + row)  # filter type 0 (None) for every scanline
    head = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", SIDE, SIDE, 8, 2, 0, 0, 0))
    body = _png_chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
    tail = _png_chunk(b"IEND", b"")
    # faKe: ancillary (f), private (a), reserved bit clear (K), safe to copy (e); decoders skip it.
    extra = _png_chunk(b"faKe", seed + _filler(pad_bytes - len(head) - len(body) - len(tail) - 20))
    return head + body + extra + tail


def jpeg(seed: bytes, pad_bytes: int = 0) -> bytes:
    """The fixed 16x16 JPEG with the seed (and any padding) in COM segments."""
    data = seed + _filler(pad_bytes - len(_JPEG) - len(seed) - 4)
    segments = [b"\xff\xfe" + struct.pack(">H", len(part) + 2) + part
                for part in (data[i:i + _COM_MAX] for i in range(0, len(data), _COM_MAX))]
    return _JPEG[:_JPEG_AFTER_APP0] + b"".join(segments) + _JPEG[_JPEG_AFTER_APP0:]


def _riff_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")


def webp(seed: bytes, pad_bytes: int = 0) -> bytes:
    """The fixed 16x16 lossless WebP in extended format, with the seed and padding in a FAKE chunk."""
    canvas = (SIDE - 1).to_bytes(3, "little") * 2
    vp8x = _riff_chunk(b"VP8X", b"\0\0\0\0" + canvas)  # no flags: no alpha, ICC, EXIF, XMP or animation
    fixed = 12 + len(vp8x) + len(_WEBP_VP8L) + 8
    extra = _riff_chunk(b"FAKE", seed + _filler(pad_bytes - fixed - len(seed)))
    chunks = vp8x + _WEBP_VP8L + extra
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks


_ENCODERS = {"png": png, "jpeg": jpeg, "webp": webp}


def encode(fmt: str, seed: bytes, pad_bytes: int = 0) -> bytes:
    """Image bytes in ``fmt`` (png, jpeg or webp)."""
    return _ENCODERS[fmt](seed, pad_bytes)


@lru_cache(maxsize=4096)
def _small_b64(fmt: str, seed: bytes, pad_bytes: int) -> str:
    return base64.b64encode(encode(fmt, seed, pad_bytes)).decode()


@lru_cache(maxsize=8)
def _large_b64(fmt: str, seed: bytes, pad_bytes: int) -> str:
    return base64.b64encode(encode(fmt, seed, pad_bytes)).decode()


def encode_b64(fmt: str, seed: bytes, pad_bytes: int = 0) -> str:
    """Base64 of ``encode(...)``, cached: benchmarks ask for the same images again and again."""
    cache = _small_b64 if pad_bytes < 65536 else _large_b64  # few padded images: they are megabytes
    return cache(fmt, seed, pad_bytes)
