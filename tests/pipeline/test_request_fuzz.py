"""Fuzzing the generations request parser against an independent reading of SPEC §2.

Properties, for any body: the gateway answers a 400 or accepts (never another error, which
would be a 5xx), and it accepts exactly the bodies the SPEC's rules accept, so nothing
invalid reaches the upstream and nothing valid is refused.
"""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import parse_settings
from gateway.errors import GatewayError
from gateway.http.body import parse_json_object
from gateway.pipeline.request import validate_image_request

SETTINGS = parse_settings({}, env={})
GPT = {"gpt-image-2", "gpt-image-1.5", "gpt-image-1"}
MODELS = [*sorted(GPT), "dall-e-2", "dall-e-3"]
PROMPT_MAX = {"dall-e-2": 1000, "dall-e-3": 4000}
SIZES = {"gpt": {"1024x1024", "1536x1024", "1024x1536", "auto"}, "dall-e-2": {"256x256", "512x512", "1024x1024"},
         "dall-e-3": {"1024x1024", "1792x1024", "1024x1792"}}
QUALITY = {"gpt": {"low", "medium", "high", "auto"}, "dall-e-3": {"standard", "hd"}, "dall-e-2": {"standard"}}
ENUMS = {"background": {"transparent", "opaque", "auto"}, "moderation": {"auto", "low"},
         "output_format": {"png", "jpeg", "webp"}, "response_format": {"url", "b64_json"},
         "style": {"vivid", "natural"}}
KNOWN = {"prompt", "model", "n", "size", "quality", "stream", "partial_images", "output_compression", "user",
         *ENUMS}


def _int(v: Any) -> bool:
    return type(v) is int


def _free_size(size: str) -> bool:
    m = re.fullmatch(r"([1-9][0-9]*)x([1-9][0-9]*)", size)
    if not m:
        return False
    w, h = int(m[1]), int(m[2])
    return w % 16 == 0 and h % 16 == 0 and max(w, h) <= 3840 and max(w, h) <= 3 * min(w, h)


def spec_accepts(body: dict[str, Any]) -> bool:
    """SPEC §2, read independently of the gateway's code (null counts as absent)."""
    if any(k not in KNOWN and k.lower() in KNOWN for k in body):
        return False
    d = {k: v for k, v in body.items() if v is not None}
    model = d.get("model", "gpt-image-1")
    if model not in MODELS:
        return False
    fam = "gpt" if model in GPT else model
    prompt = d.get("prompt")
    if type(prompt) is not str or not prompt or len(prompt) > PROMPT_MAX.get(model, 32000):
        return False
    if "n" in d and not (_int(d["n"]) and 1 <= d["n"] <= (1 if model == "dall-e-3" else 10)):
        return False
    if "size" in d and not (type(d["size"]) is str and (d["size"] in SIZES[fam] or
                                                          (model == "gpt-image-2" and _free_size(d["size"])))):
        return False
    if "quality" in d and not (type(d["quality"]) is str and d["quality"] in QUALITY[fam]):
        return False
    gpt_only = ("stream", "partial_images", "background", "moderation", "output_format", "output_compression")
    if fam != "gpt" and any(f in d for f in gpt_only):
        return False
    if ("response_format" in d and fam == "gpt") or ("style" in d and model != "dall-e-3"):
        return False
    if "stream" in d and type(d["stream"]) is not bool:
        return False
    if "partial_images" in d and not (_int(d["partial_images"]) and 0 <= d["partial_images"] <= 3):
        return False
    if d.get("partial_images") and d.get("stream") is not True:
        return False
    if "output_compression" in d and not (_int(d["output_compression"]) and 0 <= d["output_compression"] <= 100):
        return False
    for name, allowed in ENUMS.items():
        if name in d and not (type(d[name]) is str and d[name] in allowed):
            return False
    if "user" in d and type(d["user"]) is not str:
        return False
    return not (d.get("background") == "transparent" and d.get("output_format") not in (None, "png", "webp"))


_values = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 12), st.integers(95, 105),
    st.floats(allow_nan=False, allow_infinity=False),  # neither is JSON: json.dumps writes NaN, Infinity
    st.sampled_from(sorted({*MODELS, "dall-e-4", *SIZES["gpt"], *SIZES["dall-e-2"], *SIZES["dall-e-3"],
                            *QUALITY["gpt"], "standard", "hd", *(v for vs in ENUMS.values() for v in vs),
                            "2048x1152", "3840x1280", "16x48", "4000x1000", "1000x1000", "0x0", ""})),
    st.text(max_size=8), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers()),
)
_names = st.one_of(st.sampled_from(sorted(KNOWN)), st.sampled_from(["Model", "N", "PROMPT", "Stream", "zz", "extra"]))
_bodies = st.dictionaries(_names, _values, max_size=7).map(
    lambda d: d if "prompt" in d or not d else {**d, "prompt": "a lighthouse"})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_bodies)
def test_the_parser_accepts_exactly_what_the_spec_accepts(body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    try:
        image = validate_image_request(parse_json_object(raw), SETTINGS)
    except GatewayError as err:
        assert err.status == 400, err.message
        assert not spec_accepts(body), f"refused a valid request: {err.message}"
        return
    assert spec_accepts(body), f"accepted an invalid request: {body}"
    assert image.model == (body.get("model") or "gpt-image-1")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_bytes_get_a_400_or_a_valid_request_never_a_crash(raw: bytes) -> None:
    try:
        validate_image_request(parse_json_object(raw), SETTINGS)
    except GatewayError as err:
        assert err.status == 400
