"""Token estimates for image generation: the gpt-image size x quality table.

Used to reserve quota before the upstream call (settled to the reported usage after)
and by the fake upstream to report realistic usage.
"""

from __future__ import annotations

from collections.abc import Mapping

# Output tokens of one gpt-image image, by size and quality (OpenAI's published table).
GPT_IMAGE_OUTPUT_TOKENS: dict[str, dict[str, int]] = {
    "1024x1024": {"low": 272, "medium": 1056, "high": 4160},
    "1024x1536": {"low": 408, "medium": 1584, "high": 6240},
    "1536x1024": {"low": 400, "medium": 1568, "high": 6208},
}
_BASE_AREA = 1024 * 1024
# Input image tokens reserved per image uploaded to an edit, unless the model's config sets
# ``input_image_tokens_per_image``: above the ~800 a 1024x1024 input costs at low fidelity, below
# what large images at input_fidelity=high reach. The reservation settles to the reported usage.
DEFAULT_INPUT_IMAGE_TOKENS = 1500


def output_tokens_per_image(size: str | None, quality: str | None,
                            overrides: Mapping[str, int] | None = None) -> int:
    """Output tokens for one image; ``auto`` (or unknown) resolves to the most expensive choice."""
    size = size or "auto"
    quality = quality if quality in ("low", "medium", "high") else "high"
    if overrides:
        hit = overrides.get(f"{quality}-{size}")
        if hit is not None:
            return hit
    if size in GPT_IMAGE_OUTPUT_TOKENS:
        return GPT_IMAGE_OUTPUT_TOKENS[size][quality]
    if size == "auto":
        return max(row[quality] for row in GPT_IMAGE_OUTPUT_TOKENS.values())
    try:  # free WIDTHxHEIGHT (gpt-image-2): scale the square figure by area
        width, height = (int(x) for x in size.lower().split("x"))
    except ValueError:
        return max(row[quality] for row in GPT_IMAGE_OUTPUT_TOKENS.values())
    return -(-GPT_IMAGE_OUTPUT_TOKENS["1024x1024"][quality] * width * height // _BASE_AREA)


def input_image_tokens(images: int, per_image: int | None = None) -> int:
    """Input image tokens to reserve for an edit's ``images`` uploaded images."""
    return images * (DEFAULT_INPUT_IMAGE_TOKENS if per_image is None else per_image)


def text_tokens(prompt: str) -> int:
    """Rough input text tokens of a prompt (about four characters a token)."""
    return max(1, -(-len(prompt) // 4))
