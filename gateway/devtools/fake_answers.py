"""What the fake TTAPI answers: options and per-request knobs, error bodies, JSON bodies and SSE events."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import orjson
from aiohttp import web

from gateway.devtools import fake_images
from gateway.metering import estimates

DALL_E = ("dall-e-2", "dall-e-3")
INPUT_IMAGE_TOKENS = 323  # what the fake bills per image uploaded to an edit
_SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")
_ERRORS = {  # status -> (type, code) of OpenAI's error body
    400: ("invalid_request_error", "invalid_value"), 401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "forbidden"), 404: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"), 500: ("server_error", "server_error"),
    502: ("server_error", "bad_gateway"), 503: ("server_error", "service_unavailable"),
}


@dataclass(frozen=True)
class FakeOptions:
    """Server settings; the knob fields are defaults that a request's ``fake`` object overrides."""

    keys: frozenset[str] = frozenset()  # accepted TT-API-KEYs; empty: any non-empty key
    refuse_keys: frozenset[str] = frozenset()  # answered 403
    latency: float = 0.0
    event_gap: float = 0.0
    status: int | None = None
    hang: bool = False
    cut_after: int | None = None
    pad_bytes: int = 0
    usage: bool = True
    created: int | None = None  # fixed ``created``/``created_at`` (byte-identical answers); None: now
    gate: str | None = None  # hold the answer until the test opens this gate (POST /_fake/gates/NAME)

    def now(self) -> int:
        return int(time.time()) if self.created is None else self.created


_KNOB_TYPES: dict[str, type] = {"latency": float, "event_gap": float, "status": int, "hang": bool,
                                "cut_after": int, "pad_bytes": int, "usage": bool, "created": int, "gate": str}


class FakeError(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, default_code = _ERRORS.get(status, ("server_error" if status >= 500 else
                                                       "invalid_request_error", None))
        self.code = code or default_code

    def response(self) -> web.Response:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return web.Response(status=self.status, body=orjson.dumps({"error": error}),
                            content_type="application/json")


def knobs_of(raw: Any, options: FakeOptions) -> FakeOptions:
    """``options`` with the request's ``fake`` object applied."""
    if raw is None:
        return options
    if not isinstance(raw, dict):
        raise FakeError(400, "'fake' must be an object", "fake")
    for name, value in raw.items():
        kind = _KNOB_TYPES.get(name)
        if kind is None:
            raise FakeError(400, f"unknown fake knob {name!r}; known: {', '.join(_KNOB_TYPES)}",
                            f"fake.{name}")
        if kind is bool:
            valid = isinstance(value, bool)
        elif kind is str:
            valid = isinstance(value, str) and 0 < len(value) <= 64
        else:  # a non-negative number (an integer where kind is int); a status is an error status
            valid = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 and \
                (kind is float or isinstance(value, int)) and (name != "status" or 400 <= value <= 599)
        if not valid and value is not None:
            raise FakeError(400, f"invalid value for fake.{name}: {value!r}", f"fake.{name}")
    return replace(options, **{name: value for name, value in raw.items() if value is not None})


@dataclass(frozen=True)
class Plan:
    """A validated generation request, resolved the way the fake 'generated' it."""

    model: str
    prompt: str
    n: int
    size: str
    quality: str
    background: str
    output_format: str
    response_format: str
    partial_images: int
    stream: bool
    input_images: int = 0  # an edit's uploaded images
    kind: str = "image_generation"  # SSE event prefix: image_generation or image_edit

    @property
    def gpt_image(self) -> bool:
        return self.model.startswith("gpt-image")

    def usage(self, images: int, with_input: bool = True) -> dict[str, Any]:
        text = estimates.text_tokens(self.prompt) if with_input else 0
        image = INPUT_IMAGE_TOKENS * self.input_images if with_input else 0
        output = estimates.output_tokens_per_image(self.size, self.quality) * images
        return {"input_tokens": text + image, "input_tokens_details": {"text_tokens": text, "image_tokens": image},
                "output_tokens": output, "total_tokens": text + image + output}


def _choice(body: dict[str, Any], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    if value not in allowed:
        raise FakeError(400, f"Invalid value: {value!r}. Supported values are: {', '.join(allowed)}.", name)
    return str(value)


def plan_of(body: dict[str, Any], input_images: int | None = None) -> Plan:
    """The request as the fake 'generates' it; ``input_images`` given: an edit with that many images."""
    plan = _plan_of(body)
    if input_images is None:
        return plan
    if plan.model == "dall-e-3":
        raise FakeError(400, "dall-e-3 does not support image edits.", "model")
    return replace(plan, input_images=input_images, kind="image_edit")


def _plan_of(body: dict[str, Any]) -> Plan:
    prompt, model, n = body.get("prompt"), body.get("model") or "dall-e-2", body.get("n", 1)
    if not isinstance(prompt, str) or not prompt:
        raise FakeError(400, "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    if not isinstance(model, str) or not (model.startswith("gpt-image") or model in DALL_E):
        raise FakeError(400, f"Invalid value: {model!r}. The model does not exist.", "model")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= (1 if model == "dall-e-3" else 10):
        raise FakeError(400, f"Invalid value for 'n': {n!r}.", "n")
    stream, partial = body.get("stream") is True, body.get("partial_images") or 0
    if not isinstance(partial, int) or not 0 <= partial <= 3:
        raise FakeError(400, f"Invalid value for 'partial_images': {partial!r}.", "partial_images")
    if model in DALL_E:
        if stream:
            raise FakeError(400, f"Streaming is not supported for {model}.", "stream")
        sizes = ("256x256", "512x512", "1024x1024") if model == "dall-e-2" else ("1024x1024", "1792x1024",
                                                                                 "1024x1792")
        return Plan(model, prompt, n, _choice(body, "size", sizes, "1024x1024"),
                    _choice(body, "quality", ("standard", "hd"), "standard"), "opaque", "png",
                    _choice(body, "response_format", ("url", "b64_json"), "url"), 0, False)
    size = body.get("size") or "auto"
    if size == "auto":
        size = "1024x1024"
    elif not isinstance(size, str) or not _SIZE.match(size):
        raise FakeError(400, f"Invalid value for 'size': {size!r}.", "size")
    quality = _choice(body, "quality", ("low", "medium", "high", "auto"), "auto")
    background = _choice(body, "background", ("transparent", "opaque", "auto"), "auto")
    return Plan(model, prompt, n, size, "medium" if quality == "auto" else quality,
                "opaque" if background == "auto" else background,
                _choice(body, "output_format", fake_images.FORMATS, "png"), "b64_json", partial, stream)


def json_body(plan: Plan, knobs: FakeOptions, base_url: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = []
    for i in range(plan.n):
        seed = fake_images.image_seed(plan.prompt, i)
        item: dict[str, Any] = {}
        if plan.response_format == "url":
            item["url"] = f"{base_url}/files/{seed.hex()}-{knobs.pad_bytes}.{plan.output_format}"
        else:
            item["b64_json"] = fake_images.encode_b64(plan.output_format, seed, knobs.pad_bytes)
        if plan.model == "dall-e-3":
            item["revised_prompt"] = f"A detailed rendering of: {plan.prompt}"
        data.append(item)
    answer: dict[str, Any] = {"created": knobs.now(), "data": data}
    if plan.gpt_image:
        answer.update(background=plan.background, output_format=plan.output_format, quality=plan.quality,
                      size=plan.size)
        if knobs.usage:
            answer["usage"] = plan.usage(plan.n)
    return answer


def events(plan: Plan, knobs: FakeOptions) -> Iterator[tuple[bytes, dict[str, Any] | None, bool]]:
    """(SSE bytes, usage, completed?) for each event: partial images, then the final image, per image."""
    def event(kind: str, index: int, partial: int = -1) -> dict[str, Any]:
        seed = fake_images.image_seed(plan.prompt, index, partial)
        return {"type": f"{plan.kind}.{kind}", "created_at": knobs.now(), "size": plan.size,
                "quality": plan.quality, "background": plan.background, "output_format": plan.output_format,
                "b64_json": fake_images.encode_b64(plan.output_format, seed, knobs.pad_bytes)}

    for i in range(plan.n):
        for k in range(plan.partial_images):
            yield _sse({**event("partial_image", i, k), "partial_image_index": k}), None, False
        completed = event("completed", i)
        usage = plan.usage(1, with_input=i == 0) if knobs.usage else None
        if usage:
            completed["usage"] = usage
        yield _sse(completed), usage, True


def _sse(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
