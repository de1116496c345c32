"""Image formats by magic bytes and sizes from headers, checked against Pillow's own files."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from gateway.devtools import fake_images
from gateway.pipeline.image_probe import image_format, image_size


def encoded(fmt: str, size: tuple[int, int], **options: object) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "teal").save(out, fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize(("fmt", "options", "name"), [
    ("PNG", {}, "png"), ("JPEG", {}, "jpeg"), ("JPEG", {"progressive": True}, "jpeg"),
    ("JPEG", {"exif": b"Exif\0\0" + b"x" * 5000}, "jpeg"),
    ("WEBP", {"lossless": True}, "webp"), ("WEBP", {"quality": 70}, "webp"),
    ("WEBP", {"exif": b"Exif\0\0abc"}, "webp"),
])
def test_format_and_size_of_real_files(fmt: str, options: dict[str, object], name: str) -> None:
    data = encoded(fmt, (301, 47), **options)
    assert image_format(data) == name
    assert image_size(data) == (301, 47)


def test_the_fakes_images_are_read_too() -> None:
    for fmt in fake_images.FORMATS:
        data = fake_images.encode(fmt, b"seed0001", 5000)
        assert (image_format(data), image_size(data)) == (fmt, (16, 16))


@pytest.mark.parametrize("data", [b"", b"hello, this is text", b"GIF89a....", b"RIFF\0\0\0\0WAVEfmt ",
                                  b"\x89PNG\r\n"])
def test_anything_else_is_no_image(data: bytes) -> None:
    assert image_format(data) is None and image_size(data) is None


def test_a_truncated_header_has_no_size() -> None:
    assert image_size(encoded("PNG", (8, 8))[:20]) is None
    assert image_size(encoded("JPEG", (8, 8))[:30]) is None
