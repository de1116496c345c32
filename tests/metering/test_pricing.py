"""Cost and reservation estimates in integer micro-dollars, checked against hand-computed figures."""

from __future__ import annotations

from gateway.config import ModelConfig, parse_settings
from gateway.metering.estimates import DEFAULT_INPUT_IMAGE_TOKENS, text_tokens
from gateway.metering.pricing import cost_micros, estimate
from gateway.pipeline.request import EDITS, ImageRequest, validate_image_request
from gateway.upstream.observe import Usage

GPT = ModelConfig(name="gpt-image-1", family="gpt-image", input_text_per_1m=5.0, input_image_per_1m=10.0,
                  output_per_1m=40.0)
DALLE3 = ModelConfig(name="dall-e-3", family="dall-e-3", per_image={"standard-1024x1024": 0.04, "hd-1024x1024": 0.08,
                                                                      "hd-1792x1024": 0.12})


def request(model: str = "gpt-image-1", *, prompt: str = "x" * 40, n: int = 1, size: str | None = "1024x1024",
            quality: str | None = "high") -> ImageRequest:
    family = "gpt-image" if model.startswith("gpt-image") else model
    return ImageRequest(model=model, family=family, prompt=prompt, n=n, size=size, quality=quality, stream=False,
                        partial_images=0, response_format=None, output_format=None, model_defaulted=False)


def test_token_priced_cost_is_exact_in_micro_dollars() -> None:
    usage = Usage(input_text_tokens=10, input_image_tokens=100, output_tokens=4160, total_tokens=4270, images=1)
    # 10 x $5/1M + 100 x $10/1M + 4160 x $40/1M = 50 + 1000 + 166400 micro-dollars
    assert cost_micros(GPT, request(), usage) == 167_450


def test_per_image_price_by_quality_and_size_times_images() -> None:
    assert cost_micros(DALLE3, request("dall-e-3", quality="hd", size="1792x1024"), Usage(images=1)) == 120_000
    assert cost_micros(DALLE3, request("dall-e-3", quality=None, size=None), Usage(images=1)) == 40_000
    # A size/quality pair missing from the table is priced at the dearest entry, never free.
    assert cost_micros(DALLE3, request("dall-e-3", quality="hd", size="1024x1792"), Usage(images=2)) == 240_000


def test_estimate_reserves_prompt_and_output_tokens_for_every_image() -> None:
    est = estimate(GPT, request(prompt="x" * 40, n=3, quality="high"))
    assert est.tokens == 10 + 3 * 4160
    assert est.images == 3
    assert est.usd_micros == 10 * 5 + 3 * 4160 * 40


def test_estimate_of_auto_quality_reserves_for_high() -> None:
    assert estimate(GPT, request(quality="auto")).tokens == 10 + 4160


def test_estimate_of_a_per_image_model_reserves_its_price() -> None:
    est = estimate(DALLE3, request("dall-e-3", quality="hd", size="1024x1024"))
    assert (est.tokens, est.images, est.usd_micros) == (0, 1, 80_000)


# --- edits: input images reserved per image ---------------------------------------------------------

PRICES = {"input_text_per_1m": 5.0, "input_image_per_1m": 10.0, "output_per_1m": 40.0}


def test_an_edit_reserves_input_image_tokens_per_image() -> None:
    settings = parse_settings({"models": {"gpt-image-1": PRICES,
                                          "gpt-image-2": {**PRICES, "input_image_tokens_per_image": 100}}}, env={})
    body = {"prompt": "p", "size": "1024x1024", "quality": "low"}
    generation = estimate(settings.models["gpt-image-1"], validate_image_request(body, settings))
    edit = estimate(settings.models["gpt-image-1"],
                    validate_image_request(body, settings, route=EDITS, input_images=3))
    assert edit.tokens - generation.tokens == 3 * DEFAULT_INPUT_IMAGE_TOKENS
    assert edit.usd_micros - generation.usd_micros == 3 * DEFAULT_INPUT_IMAGE_TOKENS * 10
    configured = estimate(settings.models["gpt-image-2"], validate_image_request(
        {**body, "model": "gpt-image-2"}, settings, route=EDITS, input_images=3))
    assert configured.tokens == text_tokens("p") + 300 + 272


def test_a_per_image_priced_edit_reserves_its_images_only() -> None:
    settings = parse_settings({"models": {"dall-e-2": {"per_image": {"standard-1024x1024": 0.02}}}}, env={})
    request = validate_image_request({"prompt": "p", "model": "dall-e-2", "n": 2}, settings, route=EDITS,
                                     input_images=1)
    reserved = estimate(settings.models["dall-e-2"], request)
    assert (reserved.tokens, reserved.images, reserved.usd_micros) == (0, 2, 40_000)
