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

from gateway.admin.keys_api import ADMIN_ROUTES
from gateway.admin.usage_api import USAGE_ROUTES
from gateway.auth.guard import AuthGuard
from gateway.config import Settings, load_settings
from gateway.errors import GatewayError
from gateway.auth.keystore import KeyStore
from gateway.limits.limiter import Limiter
from gateway.metering.meter import Meter
from gateway.metering.metrics import Metrics
from gateway.redisdb.client import REDIS_ERRORS, open_redis
from gateway.redisdb.keys import RedisKeys
from gateway.upstream.relay import drain_background_tasks
from gateway.http.routes import GENERATIONS, ROUTES, gateway_error, internal_error, not_found
from gateway.pipeline.gateway import Gateway
from gateway.metering.settle_queue import SettleQueue, Spool
from gateway.upstream.client import UpstreamClient


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
            await drain_background_tasks(grace_seconds=settings.upstream.timeout_seconds)
            await gw.close()

    app = FastAPI(title="Image gateway", lifespan=lifespan, routes=[*ROUTES, *ADMIN_ROUTES, *USAGE_ROUTES],
                  docs_url=None, redoc_url=None, openapi_url=None,
                  exception_handlers={GatewayError: gateway_error, Exception: internal_error, 404: _not_found_handler,
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
    if redis is None:
        redis = open_redis(settings.redis)
        if settings.redis.cluster:
            # Load the slot map first: without it redis-py 8 sends early commands to the wrong node
            # and breaks connections still opening while it re-maps. Unreachable now: it maps lazily later.
            with contextlib.suppress(*REDIS_ERRORS):
                await redis.initialize()
    redis_keys = RedisKeys(settings.redis.key_prefix)
    keystore = KeyStore(redis, redis_keys, settings, metrics=metrics)
    guard = AuthGuard(redis, redis_keys, settings.auth, metrics)
    # A slot or reservation whose worker died expires one upstream timeout (plus slack) after admission.
    limiter = Limiter(redis, redis_keys, lease_ms=int((settings.upstream.timeout_seconds + 60) * 1000),
                      ledger_maxlen=settings.usage.stream_maxlen)
    # Metering: settlements Redis refuses are retried in the background, spooled at shutdown, replayed here.
    settler = SettleQueue(limiter, metrics, redis=redis, keys=redis_keys,
                          max_size=settings.usage.settle_queue_size, spool=Spool(settings.usage.spool_path))
    meter = Meter(settings, metrics, limiter, settler=settler)
    await meter.start()
    return Gateway(settings, metrics=metrics, upstream=upstream, redis=redis, keystore=keystore, guard=guard,
                   limiter=limiter, meter=meter)


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (each worker loads the config named by GATEWAY_CONFIG)."""
    return create_app(load_settings())
