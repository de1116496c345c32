"""Cost and reservation estimates, in integer micro-dollars so every sum is exact.

Metrics, quota aggregates and ledger records all carry the same per-request figure.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import ModelConfig
from gateway.metering.estimates import input_image_tokens, output_tokens_per_image, text_tokens
from gateway.pipeline.request import ImageRequest
from gateway.upstream.observe import Usage

MICROS = 1_000_000


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a request is expected to cost, reserved before the upstream call."""

    tokens: int
    images: int
    usd_micros: int


def cost_micros(model: ModelConfig, request: ImageRequest, usage: Usage) -> int:
    """Cost of a finished request from the configured price table (0 for an unpriced model)."""
    if model.per_image is not None:
        quality = request.quality or "standard"
        size = request.size or "1024x1024"
        price = model.per_image.get(f"{quality}-{size}")
        if price is None:
            price = max(model.per_image.values(), default=0.0)
        return round(price * MICROS) * usage.images
    # USD per 1M tokens equals micro-dollars per token.
    return round(usage.input_text_tokens * (model.input_text_per_1m or 0.0)
                 + usage.input_image_tokens * (model.input_image_per_1m or 0.0)
                 + usage.output_tokens * (model.output_per_1m or 0.0))


def estimate(model: ModelConfig, request: ImageRequest) -> Estimate:
    """Tokens, images and cost to reserve for ``request`` (``auto`` resolves to the dearest choice)."""
    if model.family == "gpt-image" or (model.family is None and model.per_image is None):
        out = output_tokens_per_image(request.size, request.quality, model.output_tokens) * request.n
        images_in = input_image_tokens(request.input_images, model.input_image_tokens_per_image)
        usage = Usage(input_text_tokens=text_tokens(request.prompt), input_image_tokens=images_in,
                      output_tokens=out, images=request.n)
        usage.total_tokens = usage.input_text_tokens + images_in + out
    else:
        usage = Usage(images=request.n)
    return Estimate(tokens=usage.total_tokens, images=request.n, usd_micros=cost_micros(model, request, usage))
