"""Admission's own failure paths, against real Redis clients (one pointed at a port nobody listens on)."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from gateway.auth.authenticator import Principal
from gateway.config import Limits, parse_settings
from gateway.limits.limiter import Limiter
from gateway.metering.metrics import Metrics
from gateway.pipeline.admission import cancel_admission
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.gateway import Gateway
from gateway.pipeline.request import validate_image_request
from gateway.redisdb.keys import RedisKeys
from gateway.upstream.client import UpstreamClient
from tests.support.procs import free_port


async def test_a_cancel_that_never_reaches_redis_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    settings = parse_settings({}, env={"TTAPI_API_KEY": "k"})
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    metrics = Metrics(CollectorRegistry())
    limiter = Limiter(dead, RedisKeys(), lease_ms=60_000)
    gw = Gateway(settings, metrics=metrics, upstream=UpstreamClient(settings.upstream), redis=dead, limiter=limiter)
    principal = Principal(key_id="k1", user="dora", team=None, plan="default", limits=Limits(), models=None)
    exchange = Exchange("rid-lost", principal, validate_image_request({"prompt": "x"}, settings))
    with caplog.at_level(logging.ERROR, logger="gateway"):
        await cancel_admission(gw, exchange, attempts=2, first_delay=0.01)
    await dead.aclose()
    assert metrics.registry.get_sample_value("gateway_redis_errors_total", {"op": "cancel"}) == 2
    lines = [r.getMessage() for r in caplog.records]
    assert any("rid-lost" in line and "lease" in line for line in lines), lines
