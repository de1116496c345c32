"""The gateway's components wired together, opened in the app's lifespan."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request

from gateway.auth.authenticator import Authenticator, Principal
from gateway.auth.guard import AuthGuard
from gateway.config import Settings
from gateway.errors import ServiceUnavailable
from gateway.pipeline.exchange import Exchange
from gateway.auth.keystore import KeyStore
from gateway.metering.meter import Meter
from gateway.metering.metrics import Metrics
from gateway.metering.pricing import estimate
from gateway.redisdb.client import REDIS_ERRORS
from gateway.upstream.relay import spawn
from gateway.upstream.client import UpstreamClient


class Gateway:
    """Everything a request needs: settings, clients, limiter, meter. One per worker."""

    def __init__(self, settings: Settings, *, metrics: Metrics, upstream: UpstreamClient, redis: Any = None,
                 limiter: Any = None, auth: Authenticator | None = None, meter: Meter | None = None,
                 keystore: KeyStore | None = None, guard: AuthGuard | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.upstream = upstream
        self.redis = redis
        self.limiter = limiter
        self.keystore = keystore
        self.guard = guard
        self.auth = auth or Authenticator(settings, store=keystore)
        self.meter = meter or Meter(settings, metrics, limiter)

    async def authenticate(self, request: Request) -> Principal:
        """The caller's Principal; failures count toward the brute-force guard (a good key costs nothing)."""
        authorization = request.headers.get("authorization")
        if self.guard is None:
            return await self.auth.authenticate(authorization)
        return await self.guard.authenticate(request, lambda: self.auth.authenticate(authorization))

    async def admit(self, exchange: Exchange) -> list[tuple[bytes, bytes]]:
        """Reserve the request's limits in one Redis round trip; returns the x-ratelimit headers."""
        model = self.settings.models[exchange.request.model]
        exchange.estimate = estimate(model, exchange.request)
        if self.limiter is None:
            return []
        p = exchange.principal
        try:
            admission = await self.limiter.admit(
                user=p.user, limits=p.limits, request_id=exchange.request_id, n=exchange.request.n,
                est_tokens=exchange.estimate.tokens, est_usd_micros=exchange.estimate.usd_micros,
                now_ms=exchange.started_ms)
        except REDIS_ERRORS as exc:
            self.metrics.redis_errors.labels("admit").inc()
            if self.settings.redis.on_unavailable == "allow":
                # Served unmetered; its settlement later also frees what admit may have written.
                self.metrics.unmetered.inc()
                return []
            # The script may have run with only its answer lost: undo it once Redis answers again.
            spawn(self._cancel_admission(exchange))
            raise ServiceUnavailable("The gateway's limit store is unavailable; try again shortly.") from exc
        exchange.admission = admission
        return [(k.encode(), v.encode()) for k, v in admission.headers.items()]

    async def _cancel_admission(self, exchange: Exchange, attempts: int = 8) -> None:
        """Free the slot, window entries and reservation of a request refused with 503 (bounded retries)."""
        assert self.limiter is not None
        delay = 0.1
        for _ in range(attempts):
            try:
                await self.limiter.cancel(user=exchange.principal.user, request_id=exchange.request_id,
                                          n=exchange.request.n, now_ms=exchange.started_ms)
                return
            except REDIS_ERRORS:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        # Still unreachable: the lease expires by itself (upstream timeout + 60 s after admission).

    async def not_ready_reason(self) -> str | None:
        if self.redis is None:
            return None
        try:
            await self.redis.ping()
        except REDIS_ERRORS as exc:
            self.metrics.redis_errors.labels("ping").inc()
            return f"redis unavailable ({type(exc).__name__})"
        return None

    async def close(self) -> None:
        await self.meter.close()
        await self.upstream.close()
        if self.redis is not None:
            await self.redis.aclose()
