"""Plain ASGI middleware (never buffers a stream): request ids, arrival time, in-flight gauge."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.http.context import stamp
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
