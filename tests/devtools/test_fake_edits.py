"""The fake TTAPI's edits: multipart in, real images and image-token usage out, what arrived in stats."""

from __future__ import annotations

import base64
import hashlib

import httpx
import openai

from gateway.devtools import fake_images
from gateway.devtools.fake_answers import INPUT_IMAGE_TOKENS
from gateway.metering import estimates
from tests.devtools.test_fake_upstream import KEY, decode, error_of, stats
from tests.support.procs import Service


def test_edit_bills_input_image_tokens_and_records_what_it_received(client: openai.OpenAI,
                                                                    upstream: Service) -> None:
    first, second = fake_images.encode("png", b"first-01"), fake_images.encode("webp", b"second-2")
    result = client.images.edit(model="gpt-image-1", prompt="a hat", size="1024x1024", quality="low",
                                image=[("a.png", first, "image/png"), ("b.webp", second, "image/webp")])
    assert result.data is not None
    decode(base64.b64decode(result.data[0].b64_json or ""), "png")
    text = estimates.text_tokens("a hat")
    images = 2 * INPUT_IMAGE_TOKENS
    assert result.usage is not None and result.usage.model_dump(exclude_none=True) == {
        "input_tokens": text + images, "input_tokens_details": {"text_tokens": text, "image_tokens": images},
        "output_tokens": 272, "total_tokens": text + images + 272}
    seen = stats(upstream.url)
    assert seen["usage"]["input_image_tokens"] == images
    [entry] = seen["recent"]
    assert [(f["field"], f["filename"], f["content_type"], f["size"], f["sha256"]) for f in entry["files"]] == [
        ("image[]", "a.png", "image/png", len(first), hashlib.sha256(first).hexdigest()),
        ("image[]", "b.webp", "image/webp", len(second), hashlib.sha256(second).hexdigest())]
    assert dict(entry["fields"])["quality"] == "low"


def test_streamed_edit_sends_image_edit_events(client: openai.OpenAI) -> None:
    events = list(client.images.edit(model="gpt-image-1", prompt="p", stream=True, partial_images=1,
                                     image=("a.png", fake_images.encode("png", b"12345678"), "image/png")))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert events[-1].usage.input_tokens_details.image_tokens == INPUT_IMAGE_TOKENS  # type: ignore[union-attr]


def test_edit_refusals(upstream: Service) -> None:
    url, headers = upstream.url + "/v1/images/edits", {"TT-API-KEY": KEY}
    png = ("a.png", fake_images.encode("png", b"12345678"), "image/png")
    cases = [({"prompt": (None, "p"), "model": (None, "dall-e-3"), "image": png}, "model"),
             ({"prompt": (None, "p"), "model": (None, "gpt-image-1")}, "image")]
    for files, param in cases:
        response = httpx.post(url, files=files, headers=headers)
        assert response.status_code == 400 and error_of(response)["param"] == param
    assert httpx.post(url, json={"prompt": "p"}, headers=headers).status_code == 400
    assert stats(upstream.url)["usage"]["images"] == 0
