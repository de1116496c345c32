"""Metering: what a finished request used, into Prometheus and (through the limiter) the Redis ledger.

One figure per request, computed once, goes to the metrics, the quota aggregates and the
ledger record alike, so they always reconcile. The usage billed is what the upstream
reported for a 2xx answer: a stream cut after some images completed still bills those
(the upstream billed them; ``incomplete`` flags the record); an error answer bills nothing
and only gives its reservation back.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.auth.authenticator import Principal
from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.limits.limiter import NO_USAGE, SettledUsage
from gateway.metering.ledger import build_record
from gateway.metering.metrics import Metrics
from gateway.metering.pricing import cost_micros
from gateway.metering.settle_queue import Settlement, SettleQueue, unmetered_admission
from gateway.pipeline.exchange import Exchange


def upstream_outcome(exchange: Exchange) -> str:
    if exchange.error_reason:
        return exchange.error_reason
    return "ok" if 200 <= exchange.status < 300 else f"status_{exchange.status // 100}xx"


def billed_usage(settings: Settings, exchange: Exchange) -> SettledUsage:
    """What the request is billed: the reported usage of a 2xx answer, priced; nothing otherwise."""
    if not (200 <= exchange.status < 300 or exchange.upstream_billed):
        return NO_USAGE
    u = exchange.usage
    usd = cost_micros(settings.models[exchange.request.model], exchange.request, u)
    return SettledUsage(input_text_tokens=u.input_text_tokens, input_image_tokens=u.input_image_tokens,
                        output_tokens=u.output_tokens, total_tokens=u.total_tokens, images=u.images,
                        usd_micros=usd)


class Meter:
    """Records finished and refused requests."""

    def __init__(self, settings: Settings, metrics: Metrics, limiter: Any = None,
                 settler: SettleQueue | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.limiter = limiter
        if settler is None and limiter is not None:
            settler = SettleQueue(limiter, metrics, max_size=settings.usage.settle_queue_size)
        self.settler = settler

    def refused(self, route: str, model: str, err: GatewayError, principal: Principal | None) -> None:
        """A request the gateway answered itself before any upstream call."""
        self.metrics.child(self.metrics.requests, route, model, str(err.status)).inc()
        limit = getattr(err, "limit_name", None)
        if err.status == 429 and limit and principal is not None:
            self.metrics.rate_limited.labels(*self.metrics.who(principal.user, principal.team), limit).inc()

    async def finish(self, exchange: Exchange) -> None:
        """Record a request that reached the upstream (or tried to): metrics, then settlement and ledger."""
        m = self.metrics
        req = exchange.request
        model_cfg = self.settings.models[req.model]
        elapsed = time.monotonic() - exchange.started
        usage = billed_usage(self.settings, exchange)
        stream = "true" if req.stream else "false"
        m.child(m.requests, exchange.route, req.model, str(exchange.status)).inc()
        m.child(m.request_duration, exchange.route, req.model, stream).observe(elapsed)
        outcome = upstream_outcome(exchange)
        if exchange.upstream_seconds is not None:
            m.child(m.upstream_duration, req.model, stream, outcome).observe(exchange.upstream_seconds)
        if outcome != "ok":
            m.child(m.upstream_errors, outcome).inc()
        who = m.who(exchange.principal.user, exchange.principal.team)
        if usage.input_text_tokens:
            m.child(m.tokens, *who, req.model, "input_text").inc(usage.input_text_tokens)
        if usage.input_image_tokens:
            m.child(m.tokens, *who, req.model, "input_image").inc(usage.input_image_tokens)
        if usage.output_tokens:
            m.child(m.tokens, *who, req.model, "output").inc(usage.output_tokens)
        if usage.images:
            m.child(m.images, *who, req.model).inc(usage.images)
            if not model_cfg.priced:
                m.unpriced.labels(req.model).inc()
        if usage.usd_micros:
            m.child(m.cost, *who, req.model).inc(usage.usd_micros / 1_000_000)
        if self.settler is None:
            return
        admission = exchange.admission or unmetered_admission(exchange.request_id, exchange.principal.user,
                                                              exchange.started_ms)
        record = build_record(exchange, usage, round(elapsed * 1000))
        await self.settler.settle(Settlement(admission, usage, record))

    async def start(self) -> None:
        """Replay settlements a previous run spooled."""
        if self.settler is not None:
            await self.settler.start()

    async def close(self) -> None:
        """Flush what is pending (settlements waiting for Redis) to Redis, else to the spool."""
        if self.settler is not None:
            await self.settler.close()
