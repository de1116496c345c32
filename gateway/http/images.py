"""Image routes: thin front doors that read and check the body, then hand the request to the pipeline."""

from __future__ import annotations

import orjson
from starlette.requests import Request

from gateway.http.body import parse_json_object, read_body
from gateway.http.context import gateway_of, received_of, request_id_of
from gateway.pipeline.lifecycle import Arrival, Prepared, handle
from gateway.pipeline.request import GENERATIONS, validate_image_request


def arrival_of(request: Request, route: str) -> Arrival:
    received, received_ms = received_of(request)
    return Arrival(request, request_id_of(request), route, received, received_ms)


async def create_image(request: Request) -> object:
    """``POST /v1/images/generations``: a JSON body (SPEC §2)."""
    gw = gateway_of(request)

    async def prepare() -> Prepared:
        body = await read_body(request, gw.settings.max_body_bytes)
        data = parse_json_object(body)
        image = validate_image_request(data, gw.settings)
        if image.model_defaulted:
            body = with_model(body, data, image.model)
        return Prepared(image, body)

    return await handle(gw, arrival_of(request, GENERATIONS), prepare)


def with_model(body: bytes, data: dict[str, object], model: str) -> bytes:
    """``body`` with ``"model"`` added after its opening brace; every other byte stays as sent.

    Needed when the gateway applied its ``default_model``: the upstream's own default differs.
    An explicit ``"model": null`` is the one case where the body is re-serialised.
    """
    if "model" in data:
        return orjson.dumps({**data, "model": model})
    start = body.index(b"{") + 1
    rest = body[start:].lstrip()
    sep = b"" if rest.startswith(b"}") else b","
    return body[:start] + b'"model":' + orjson.dumps(model) + sep + body[start:]
