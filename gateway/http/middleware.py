"""Plain ASGI middleware (never buffers a stream): request ids, arrival time, in-flight gauge, image routes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.http.context import request_id_of, stamp
from gateway.metering.metrics import Metrics
from gateway.pipeline.request import ROUTE_NAMES


class RequestIdMiddleware:
    """Gives every request an id (``x-request-id`` on every response) and counts in-flight relays."""

    def __init__(self, app: ASGIApp, metrics_of: Callable[[], Metrics]) -> None:
        self.app = app
        self.metrics_of = metrics_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = (b"x-request-id", stamp(scope).encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                if header not in headers:
                    headers.append(header)
            await send(message)

        path = scope["path"]
        if path in ROUTE_NAMES:
            metrics = self.metrics_of()
            inflight = metrics.child(metrics.inflight, path)
        else:
            inflight = None
        if inflight is None:
            await self.app(scope, receive, send_with_id)
            return
        inflight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            inflight.dec()


class ImageRoutes:
    """``POST`` to an image route goes straight to its handler, past Starlette's router and exception layers.

    Those layers (exception middleware, router, route, request-response wrapper, each with its own
    send wrapper) are a tenth of a worker's CPU per relayed request and add nothing here: the handler
    answers a ``GatewayError`` as its exception handler would (``system.gateway_error``), and any other
    exception goes on to Starlette's server-error layer (``system.internal_error``) as before. Every
    other method and path takes the router, so 404s, 405s and the rest are unchanged.
    """

    def __init__(self, app: ASGIApp, handlers: Mapping[str, Callable[[Request], Awaitable[Any]]]) -> None:
        self.app = app
        self.handlers = dict(handlers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.handlers.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await handler(request)
        except GatewayError as err:
            response = err.to_response(request_id_of(request))
        await response(scope, receive, send)
