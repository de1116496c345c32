"""The ASGI app: ``create_app(settings, ...)`` builds it; clients are opened in the lifespan."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.config import Settings, load_settings
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.redis_client import open_redis
from gateway.relay import drain_background_tasks
from gateway.routes import ROUTES, GENERATIONS, gateway_error, not_found
from gateway.service import Gateway
from gateway.upstream import UpstreamClient


class RequestIdMiddleware:
    """Gives every request an id (``x-request-id`` on every response) and counts in-flight relays."""

    def __init__(self, app: ASGIApp, metrics_of: Any) -> None:
        self.app = app
        self.metrics_of = metrics_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = scope["request_id"] = uuid.uuid4().hex
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                if header not in headers:
                    headers.append(header)
            await send(message)

        inflight = self.metrics_of().inflight.labels(GENERATIONS) if scope["path"] == GENERATIONS else None
        if inflight is None:
            await self.app(scope, receive, send_with_id)
            return
        inflight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            inflight.dec()


def create_app(settings: Settings, *, registry: CollectorRegistry | None = None,
               session: aiohttp.ClientSession | None = None, redis: Any = None) -> FastAPI:
    """The gateway app. Tests may pass a metrics registry, an aiohttp session or a Redis client."""
    metrics = Metrics(registry, user_label=settings.metrics.user_label)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        gw = await open_gateway(settings, metrics, session=session, redis=redis)
        try:
            yield {"gateway": gw}
        finally:
            await drain_background_tasks(timeout=settings.upstream.timeout_seconds)
            await gw.close()

    app = FastAPI(title="Image gateway", lifespan=lifespan, routes=ROUTES, docs_url=None, redoc_url=None,
                  openapi_url=None, exception_handlers={GatewayError: gateway_error, 404: _not_found_handler,
                                                        405: _not_found_handler})
    app.add_middleware(RequestIdMiddleware, metrics_of=lambda: metrics)
    app.state.metrics = metrics
    return app


async def _not_found_handler(request: Any, exc: Exception) -> Any:
    return await not_found(request)


async def open_gateway(settings: Settings, metrics: Metrics, *, session: aiohttp.ClientSession | None = None,
                       redis: Any = None) -> Gateway:
    upstream = UpstreamClient(settings.upstream, session=session)
    await upstream.start()
    redis = redis if redis is not None else open_redis(settings.redis)
    return Gateway(settings, metrics=metrics, upstream=upstream, redis=redis)


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (each worker loads the config named by GATEWAY_CONFIG)."""
    return create_app(load_settings())
