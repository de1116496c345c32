"""HTTP routes: the relay, models, health, readiness, metrics, and OpenAI-shaped 404s."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.errors import GatewayError, InvalidRequest, ModelNotAllowed, NotFound, RequestTooLarge
from gateway.pipeline.exchange import Exchange
from gateway.metering.metrics import render
from gateway.upstream.relay import ChunksResponse, StreamRelayResponse, read_json_reply, spawn
from gateway.pipeline.gateway import Gateway
from gateway.upstream.client import UpstreamReply
from gateway.pipeline.request import validate_image_request

GENERATIONS = "/v1/images/generations"
log = logging.getLogger("gateway")
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]


def gateway_of(request: Request) -> Gateway:
    return request.state.gateway  # type: ignore[no-any-return]


def request_id_of(request: Request) -> str:
    rid = request.scope.get("request_id")
    if rid is None:
        rid = request.scope["request_id"] = uuid.uuid4().hex
    return rid  # type: ignore[no-any-return]


async def read_body(request: Request, limit: int) -> bytes:
    """The raw request body, refused with 413 past ``limit`` bytes (checked while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"Request body is larger than the limit of {limit} bytes.")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"Request body is larger than the limit of {limit} bytes.")
        parts.append(chunk)
    return b"".join(parts)


def parse_json_object(body: bytes) -> dict[str, object]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("We could not parse the JSON body of your request. The body must be a JSON "
                             "object (Content-Type: application/json).") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


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


async def create_image(request: Request) -> object:
    gw = gateway_of(request)
    rid = request_id_of(request)
    model_label = "-"
    principal = None
    try:
        principal = await gw.authenticate(request)
        body = await read_body(request, gw.settings.max_body_bytes)
        data = parse_json_object(body)
        image = validate_image_request(data, gw.settings)
        model_label = image.model
        if image.model_defaulted:
            body = with_model(body, data, image.model)
        if principal.models is not None and image.model not in principal.models:
            raise ModelNotAllowed(f"This key may not use the model '{image.model}'.", param="model")
        exchange = Exchange(rid, principal, image)
        limit_headers = await gw.admit(exchange)
    except GatewayError as err:
        gw.meter.refused(GENERATIONS, model_label, err, principal)
        return err.to_response(rid)
    headers = [(b"x-request-id", rid.encode()), *limit_headers]
    # Shielded and tracked: if this handler is cancelled (shutdown past its grace period), the upstream
    # call still runs to its end and is settled, so usage the upstream bills is never lost.
    timeout = gw.settings.upstream.timeout_seconds
    task = spawn(forward(gw, exchange, body, request.headers, headers))
    try:
        outcome = await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda t: _drain_orphaned_stream(t, gw, exchange, timeout))
        raise
    if isinstance(outcome, UpstreamReply):
        return StreamRelayResponse(exchange, outcome, [*_SSE_HEADERS, *headers], gw.meter.finish, timeout)
    return outcome


def _drain_orphaned_stream(task: asyncio.Task[Any], gw: Gateway, exchange: Exchange, timeout: float) -> None:
    """A stream whose requester was cancelled as its reply arrived: read it to the end and settle it."""
    if not task.cancelled() and task.exception() is None and isinstance(task.result(), UpstreamReply):
        spawn(StreamRelayResponse(exchange, task.result(), [], gw.meter.finish, timeout).drain_and_finish())


async def forward(gw: Gateway, exchange: Exchange, body: bytes, client_headers: Headers,
                  headers: list[tuple[bytes, bytes]]) -> Any:
    """The upstream call of an admitted request; finished (settled) exactly once unless it is a stream.

    Returns the stream's ``UpstreamReply`` (the relay finishes it), or the client's response.
    """
    rid = exchange.request_id
    try:
        reply = await gw.upstream.send(body, client_headers, rid)
        if reply.is_event_stream:
            return reply
        chunks = await read_json_reply(exchange, reply, gw.settings.upstream.timeout_seconds)
        exchange.status = reply.response.status
        content_type = reply.response.headers.get("content-type", "application/json").encode()
        response: Any = ChunksResponse(reply.response.status, chunks, [(b"content-type", content_type), *headers])
    except GatewayError as err:
        exchange.status = err.status
        exchange.error_reason = exchange.error_reason or err.code
        err.headers.update((k.decode(), v.decode()) for k, v in headers[1:])  # x-ratelimit-*: admitted
        response = err.to_response(rid)
    except Exception:
        exchange.status, exchange.error_reason = 500, "internal_error"
        await gw.meter.finish(exchange)
        raise
    await gw.meter.finish(exchange)
    return response


async def list_models(request: Request) -> Response:
    gw = gateway_of(request)
    rid = request_id_of(request)
    try:
        principal = await gw.authenticate(request)
    except GatewayError as err:
        return err.to_response(rid)
    names = [m for m in gw.settings.models if principal.models is None or m in principal.models]
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "image-gateway"} for m in names]
    return JSONResponse({"object": "list", "data": data}, headers={"x-request-id": rid})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    reason = await gateway_of(request).not_ready_reason()
    if reason:
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    body, content_type = render(gateway_of(request).metrics.registry)
    return Response(body, media_type=content_type)


async def not_found(request: Request) -> Response:
    err = NotFound(f"Invalid URL ({request.method} {request.url.path})")
    return err.to_response(request_id_of(request))


async def gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return exc.to_response(request_id_of(request))


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug: still OpenAI's shape and the request id (this runs outside the request-id middleware)."""
    log.error("unhandled %s in %s %s (request %s)", type(exc).__name__, request.method, request.url.path,
              request_id_of(request))
    return GatewayError("The gateway failed to handle this request.").to_response(request_id_of(request))


ROUTES = [
    Route(GENERATIONS, create_image, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
