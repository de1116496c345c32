"""Request rules for ``POST /v1/images/generations`` and ``/v1/images/edits`` (SPEC §2, §2.1).

Checked before anything is spent. Both routes share the per-model rules below; an edit's form
fields are strings, so ``form_fields`` first turns them into the JSON types the rules expect.

The body is only read, never changed or copied: the gateway forwards the client's original bytes,
and ``ImageRequest`` carries just what limits and metering need. Fields the gateway does not know
are ignored, and an explicit null counts as an absent field. Fields are checked in a fixed order
(prompt, model, n, size, quality, then the rest), so the first error reported is deterministic.

A model whose family is unknown (``None``) gets minimal checks: types, and the value sets that do
not depend on the family; every family-specific field is let through. Size and quality are copied
into usage records (and CSV exports), so for such a model they must still match ``RECORDED_SHAPES``:
short, lower-case letters, digits (and ``_`` ``-`` in quality), nothing a spreadsheet would run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config import Settings
from gateway.errors import InvalidRequest, MissingParameter

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
ROUTE_NAMES = {GENERATIONS: "generations", EDITS: "edits"}  # the ``route`` of usage records
EDIT_FAMILIES = frozenset({"gpt-image", "dall-e-2"})

PROMPT_MAX_CHARS: Mapping[str | None, int] = {"gpt-image": 32000, "dall-e-2": 1000, "dall-e-3": 4000}
DEFAULT_PROMPT_MAX_CHARS = 32000  # unknown family
GPT_IMAGE_SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")

# Models that take, besides GPT_IMAGE_SIZES, any WIDTHxHEIGHT within these limits.
FREE_SIZE_MODELS = frozenset({"gpt-image-2"})
FREE_SIZE_MULTIPLE = 16
FREE_SIZE_MAX_EDGE = 3840
FREE_SIZE_MAX_RATIO = 3
# The SPEC sets no minimum edge and no pixel-count cap, so neither is added: the gateway should not
# refuse what the upstream might accept (what it refuses comes back as its own 400, relayed as is).
# The pattern excludes 0 and leading zeros, so the smallest edge is FREE_SIZE_MULTIPLE (16 pixels);
# 3840x3840 passes (longest edge 3840, ratio 1:1).
_FREE_SIZE = re.compile(r"([1-9][0-9]{0,3})x([1-9][0-9]{0,3})", re.ASCII)  # no signs, spaces or "X"

# Fields copied into usage records, for models without a value set (unknown family): their shape.
RECORDED_SHAPES: Mapping[str, tuple[re.Pattern[str], str]] = {
    "size": (re.compile(r"[0-9a-z]{1,16}", re.ASCII), "1 to 16 lower-case letters and digits"),
    "quality": (re.compile(r"[a-z0-9_-]{1,32}", re.ASCII), "1 to 32 lower-case letters, digits, '_' and '-'"),
}

_GPT_ONLY = (frozenset({"gpt-image"}), "GPT image models")
_DALLE_ONLY = (frozenset({"dall-e-2", "dall-e-3"}), "dall-e-2 and dall-e-3")
_DALLE3_ONLY = (frozenset({"dall-e-3"}), "dall-e-3")
_JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a decimal number", str: "a string",
               list: "an array", dict: "an object"}


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """What the gateway needs of a valid generation request (the body itself is forwarded as is)."""

    model: str
    family: str | None
    prompt: str
    n: int
    size: str | None
    quality: str | None
    stream: bool
    partial_images: int
    response_format: str | None
    output_format: str | None
    model_defaulted: bool  # the body named no model and settings.default_model was used
    input_images: int = 0  # images uploaded with an edit (billed as input image tokens)


@dataclass(frozen=True, slots=True)
class _Rule:
    """How one optional field is checked."""

    name: str
    kind: type  # exact JSON type: a bool is not an integer here, nor is 2.0
    only: tuple[frozenset[str], str] | None = None  # families that take the field, and their name
    # Allowed values by family; key None: for every family. No entry: any value of the right type.
    allowed: Mapping[str | None, tuple[str, ...] | range] | None = None


_RULES = (
    _Rule("n", int, allowed={"dall-e-3": range(1, 2), None: range(1, 11)}),
    _Rule("size", str, allowed={"gpt-image": GPT_IMAGE_SIZES, "dall-e-2": ("256x256", "512x512", "1024x1024"),
                                "dall-e-3": ("1024x1024", "1792x1024", "1024x1792")}),
    _Rule("quality", str, allowed={"gpt-image": ("low", "medium", "high", "auto"),
                                   "dall-e-3": ("standard", "hd"), "dall-e-2": ("standard",)}),
    _Rule("stream", bool, _GPT_ONLY),
    _Rule("partial_images", int, _GPT_ONLY, {None: range(0, 4)}),
    _Rule("background", str, _GPT_ONLY, {None: ("transparent", "opaque", "auto")}),
    _Rule("moderation", str, _GPT_ONLY, {None: ("auto", "low")}),
    _Rule("output_format", str, _GPT_ONLY, {None: ("png", "jpeg", "webp")}),
    _Rule("output_compression", int, _GPT_ONLY, {None: range(0, 101)}),
    _Rule("response_format", str, _DALLE_ONLY, {None: ("url", "b64_json")}),
    _Rule("style", str, _DALLE3_ONLY, {None: ("vivid", "natural")}),
    _Rule("user", str),
)
_EDIT_RULES = (*_RULES, _Rule("input_fidelity", str, _GPT_ONLY, {None: ("high", "low")}))
# With an image store every model may ask for URLs: GPT image models' base64 is stored and linked (SPEC §9).
_STORED_URLS = _Rule("response_format", str, allowed={None: ("url", "b64_json")})
_FORM_KINDS = {rule.name: rule.kind for rule in _EDIT_RULES if rule.kind in (int, bool)}
_BOOLS = {"true": True, "false": False}
_INTEGER = re.compile(r"-?[0-9]{1,12}", re.ASCII)


def form_fields(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """An edit's text fields as JSON values: integers and booleans converted, a field sent twice refused."""
    values: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for name, text in pairs:
        folded = name.lower()
        if folded in seen:
            first = seen[folded]
            what = "was given twice" if first == name else f"repeats '{first}' in another letter case"
            raise InvalidRequest(f"Invalid field '{name}': it {what}.", param=name)
        seen[folded] = name
        kind = _FORM_KINDS.get(name)
        if kind is bool and text.lower() in _BOOLS:
            values[name] = _BOOLS[text.lower()]
        elif kind is int and _INTEGER.fullmatch(text):
            values[name] = int(text)
        elif kind is not None:
            raise InvalidRequest(f"Invalid type for '{name}': expected {_JSON_TYPES[kind]}, but got "
                                 f"'{text[:40]}' instead.", param=name)
        else:
            values[name] = text
    return values


def validate_image_request(body: object, settings: Settings, *, route: str = GENERATIONS,
                           input_images: int = 0) -> ImageRequest:
    """The checked request, or ``InvalidRequest``/``MissingParameter`` naming the first bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    refuse_case_variants(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise MissingParameter("Missing required parameter: 'prompt'.", param="prompt")
    _require_type("prompt", prompt, str)
    if not prompt:
        raise InvalidRequest("Invalid 'prompt': empty string. Expected a string with minimum length 1, "
                             "but got an empty string instead.", param="prompt")

    model = body.get("model")
    model_defaulted = model is None
    if model is None:
        model = settings.default_model
        if model is None:
            raise MissingParameter("Missing required parameter: 'model'.", param="model")
    _require_type("model", model, str)
    config = settings.models.get(model)
    if config is None:
        raise InvalidRequest(f"Invalid value: '{model}'. Supported values are: {_one_of(settings.models)}.",
                             param="model")
    family = config.family
    if route == EDITS and family is not None and family not in EDIT_FAMILIES:
        raise InvalidRequest(f"The model '{model}' does not support image edits; use a GPT image model "
                             "or dall-e-2.", param="model")
    limit = PROMPT_MAX_CHARS.get(family, DEFAULT_PROMPT_MAX_CHARS)
    if len(prompt) > limit:
        raise InvalidRequest(f"Invalid 'prompt': string too long. Expected a string with maximum length "
                             f"{limit}, but got a string with length {len(prompt)} instead.", param="prompt")

    values: dict[str, Any] = {}
    rules: tuple[_Rule, ...] = _EDIT_RULES if route == EDITS else _RULES
    if settings.storage.enabled:
        rules = tuple(_STORED_URLS if rule.name == "response_format" else rule for rule in rules)
    for rule in rules:
        value = body.get(rule.name)
        if value is not None:
            _check(rule, value, model, family)
            values[rule.name] = value
    if values.get("partial_images") and not values.get("stream"):  # 0, the default, is fine without it
        raise InvalidRequest("'partial_images' is only supported when 'stream' is true.",
                             param="partial_images")
    if values.get("response_format") == "url" and values.get("stream") and family == "gpt-image":
        raise InvalidRequest("'response_format' 'url' is not supported with 'stream': streamed images come as "
                             "base64 events.", param="response_format")
    if values.get("background") == "transparent" and values.get("output_format") not in (None, "png", "webp"):
        raise InvalidRequest("A transparent background needs 'output_format' 'png' or 'webp'.",
                             param="background")
    return ImageRequest(
        model=model,
        family=family,
        prompt=prompt,
        n=values.get("n", 1),
        size=values.get("size"),
        quality=values.get("quality"),
        stream=values.get("stream", False),
        partial_images=values.get("partial_images", 0),
        response_format=values.get("response_format"),
        output_format=values.get("output_format"),
        model_defaulted=model_defaulted,
        input_images=input_images,
    )


KNOWN_FIELDS = frozenset({"prompt", "model", *(rule.name for rule in _EDIT_RULES)})


def refuse_case_variants(body: Mapping[str, Any]) -> None:
    """Refuse a key that differs from a known field only by letter case (``Model``, ``N``).

    Case-insensitive parsers upstream (Go's encoding/json) would read it as that field.
    """
    for name in body:
        if name not in KNOWN_FIELDS and name.lower() in KNOWN_FIELDS:
            raise InvalidRequest(f"Unknown field '{name}': did you mean '{name.lower()}'? Field names are "
                                 "case-sensitive.", param=name)


def _check(rule: _Rule, value: Any, model: str, family: str | None) -> None:
    name = rule.name
    if rule.only is not None and family is not None and family not in rule.only[0]:
        raise InvalidRequest(f"'{name}' is only supported for {rule.only[1]}.", param=name)
    _require_type(name, value, rule.kind)
    allowed = None if rule.allowed is None else rule.allowed.get(family, rule.allowed.get(None))
    if allowed is None:
        shape = RECORDED_SHAPES.get(name)
        if shape is not None and not shape[0].fullmatch(value):
            raise InvalidRequest(f"Invalid '{name}': expected {shape[1]}.", param=name)
        return
    if value in allowed:
        return
    if isinstance(allowed, range):
        low, high = allowed.start, allowed.stop - 1
        side, bound = ("below minimum", f">= {low}") if value < low else ("above maximum", f"<= {high}")
        raise InvalidRequest(f"Invalid '{name}': integer {side} value. Expected a value {bound}, "
                             f"but got {value} instead.", param=name)
    if name == "size" and model in FREE_SIZE_MODELS:
        problem = _free_size_problem(value)
        if problem is None:
            return
        raise InvalidRequest(f"Invalid value: '{value}'. {problem}", param=name)
    raise InvalidRequest(f"Invalid value: '{value}'. Supported values are: {_one_of(allowed)}.", param=name)


def _free_size_problem(size: str) -> str | None:
    """Why ``size`` is not a free WIDTHxHEIGHT, or None when it is one."""
    match = _FREE_SIZE.fullmatch(size)
    if match is None:
        return (f"Supported values are: {_one_of(GPT_IMAGE_SIZES)}, or WIDTHxHEIGHT in pixels "
                "(e.g. '2048x1152').")
    width, height = int(match[1]), int(match[2])
    short, long = sorted((width, height))
    if width % FREE_SIZE_MULTIPLE or height % FREE_SIZE_MULTIPLE:
        return f"Width and height must both be multiples of {FREE_SIZE_MULTIPLE}."
    if long > FREE_SIZE_MAX_EDGE:
        return f"The longest edge must be at most {FREE_SIZE_MAX_EDGE} pixels."
    if long > FREE_SIZE_MAX_RATIO * short:
        return f"The aspect ratio must be between 1:{FREE_SIZE_MAX_RATIO} and {FREE_SIZE_MAX_RATIO}:1."
    return None


def _require_type(name: str, value: Any, kind: type) -> None:
    if type(value) is not kind:
        got = _JSON_TYPES.get(type(value), "another type")
        raise InvalidRequest(f"Invalid type for '{name}': expected {_JSON_TYPES[kind]}, "
                             f"but got {got} instead.", param=name)


def _one_of(values: Iterable[str]) -> str:
    """'a', 'b', and 'c' (OpenAI's wording for a list of supported values)."""
    quoted = [f"'{v}'" for v in values]
    return " and ".join(quoted) if len(quoted) < 3 else ", ".join(quoted[:-1]) + ", and " + quoted[-1]


def stored_as_urls(request: ImageRequest) -> bool:
    """The gateway stores this request's images and answers URLs (a GPT image model asked for ``url``).

    The upstream is asked for base64 (those models answer nothing else): ``response_format`` is not sent.
    """
    return request.response_format == "url" and request.family == "gpt-image"
