"""Metering: what a finished request used, into Prometheus and (through the limiter) Redis."""

from __future__ import annotations

import time
from typing import Any

from gateway.auth import Principal
from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.exchange import Exchange
from gateway.metrics import Metrics
from gateway.pricing import cost_micros

ROUTE = "/v1/images/generations"


def upstream_outcome(exchange: Exchange) -> str:
    if exchange.error_reason:
        return exchange.error_reason
    return "ok" if 200 <= exchange.status < 300 else f"status_{exchange.status // 100}xx"


class Meter:
    """Records finished and refused requests."""

    def __init__(self, settings: Settings, metrics: Metrics, limiter: Any = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.limiter = limiter

    def refused(self, route: str, model: str, err: GatewayError, principal: Principal | None) -> None:
        """A request the gateway answered itself before any upstream call."""
        self.metrics.requests.labels(route, model, str(err.status)).inc()
        limit = getattr(err, "limit_name", None)
        if err.status == 429 and limit and principal is not None:
            self.metrics.rate_limited.labels(*self.metrics.who(principal.user, principal.team), limit).inc()

    async def finish(self, exchange: Exchange) -> None:
        """Record a request that reached the upstream (or tried to): metrics, then settlement."""
        m = self.metrics
        req = exchange.request
        model_cfg = self.settings.models[req.model]
        usage = exchange.usage
        usd_micros = cost_micros(model_cfg, req, usage) if exchange.ok else 0
        stream = "true" if req.stream else "false"
        m.requests.labels(ROUTE, req.model, str(exchange.status)).inc()
        m.request_duration.labels(ROUTE, req.model, stream).observe(time.monotonic() - exchange.started)
        outcome = upstream_outcome(exchange)
        if exchange.upstream_seconds is not None:
            m.upstream_duration.labels(req.model, stream, outcome).observe(exchange.upstream_seconds)
        if outcome != "ok":
            m.upstream_errors.labels(outcome).inc()
        who = m.who(exchange.principal.user, exchange.principal.team)
        if usage.input_text_tokens:
            m.tokens.labels(*who, req.model, "input_text").inc(usage.input_text_tokens)
        if usage.input_image_tokens:
            m.tokens.labels(*who, req.model, "input_image").inc(usage.input_image_tokens)
        if usage.output_tokens:
            m.tokens.labels(*who, req.model, "output").inc(usage.output_tokens)
        if usage.images:
            m.images.labels(*who, req.model).inc(usage.images)
            if not model_cfg.priced:
                m.unpriced.labels(req.model).inc()
        if usd_micros:
            m.cost.labels(*who, req.model).inc(usd_micros / 1_000_000)

    async def close(self) -> None:
        """Flush what is pending (settlements waiting for Redis)."""
