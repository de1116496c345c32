"""Routes around the relay: models, health, readiness, metrics, and OpenAI-shaped 404s and 500s."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.auth.authenticator import bearer_token, token_matches
from gateway.errors import GatewayError, MetricsUnauthorized, NotFound
from gateway.http.context import gateway_of, request_id_of
from gateway.metering.metrics import render

log = logging.getLogger("gateway")


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
    """The Prometheus exposition; behind GATEWAY_METRICS_TOKEN when set, only on metrics.port when that is set."""
    gw = gateway_of(request)
    if gw.settings.metrics.port is not None:
        return await not_found(request)  # kept off the API port
    token = gw.settings.metrics_token
    if token is not None and not token_matches(bearer_token(request.headers.get("authorization")), token):
        return MetricsUnauthorized().to_response(request_id_of(request))
    body, content_type = render(gw.metrics.registry)
    return Response(body, media_type=content_type)


async def not_found(request: Request, exc: Exception | None = None) -> Response:
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
