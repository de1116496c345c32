"""Admission: reserve a request's limits in Redis before the upstream call, or undo a lost one."""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.errors import ServiceUnavailable
from gateway.metering.ledger import unsettled_record
from gateway.metering.pricing import estimate
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.gateway import Gateway
from gateway.redisdb.batcher import Shed
from gateway.redisdb.client import REDIS_ERRORS
from gateway.redisdb.health import CircuitOpen
from gateway.tasks import spawn

log = logging.getLogger("gateway.admission")

RETRY_AFTER = "1"  # seconds, on a 503 from shedding or an unavailable Redis


async def enter_intake(gw: Gateway, exchange: Exchange) -> None:
    """Take the request's place in the intake (pipeline/intake.py); 503 with ``retry-after`` when shed.

    Waiting here and then for a Redis pipeline share one budget, ``redis.admission_wait_seconds``,
    and each queue holds at most ``redis.admission_queue``.
    """
    exchange.admission_deadline = time.monotonic() + gw.settings.redis.admission_wait_seconds
    try:
        exchange.intake = await gw.intake.enter(exchange.admission_deadline)
    except Shed as exc:
        raise _shed(gw, exc) from exc


def _shed(gw: Gateway, exc: Shed) -> ServiceUnavailable:
    """Deliberate load shedding: counted, answered 503; never sent to Redis, so nothing to undo."""
    gw.metrics.admission_shed.labels(exc.reason).inc()
    return ServiceUnavailable("The gateway is overloaded; try again shortly.", headers={"retry-after": RETRY_AFTER})


async def admit(gw: Gateway, exchange: Exchange, mode: str = "all") -> list[tuple[bytes, bytes]]:
    """Reserve the request's limits in one Redis round trip; returns the x-ratelimit headers.

    ``mode`` "reserve": a job's submission, which reserves the quotas only (``Limiter.admit``).
    """
    model = gw.settings.models[exchange.request.model]
    exchange.estimate = estimate(model, exchange.request)
    if gw.limiter is None:
        return []
    p = exchange.principal
    try:
        admission = await gw.limiter.admit(
            user=p.user, limits=p.limits, request_id=exchange.request_id, n=exchange.request.n,
            est_tokens=exchange.estimate.tokens, est_usd_micros=exchange.estimate.usd_micros,
            now_ms=exchange.started_ms, mode=mode, lease_from_ms=time.time_ns() // 1_000_000,
            record=unsettled_record(exchange, exchange.estimate.tokens, exchange.estimate.usd_micros),
            queue_deadline=exchange.admission_deadline or time.monotonic() + gw.settings.redis.admission_wait_seconds)
    except Shed as exc:
        raise _shed(gw, exc) from exc
    except REDIS_ERRORS as exc:
        gw.metrics.redis_errors.labels("admit").inc()
        if gw.settings.redis.on_unavailable == "allow":
            # Served unmetered; its settlement later also frees what admit may have written.
            gw.metrics.unmetered.inc()
            return []
        if not isinstance(exc, CircuitOpen):
            # The script may have run with only its answer lost: undo it once Redis answers again.
            spawn(cancel_admission(gw, exchange))
        raise ServiceUnavailable("The gateway's limit store is unavailable; try again shortly.",
                                 headers={"retry-after": RETRY_AFTER}) from exc
    exchange.admission = admission
    return [(k.encode(), v.encode()) for k, v in admission.headers.items()]


async def cancel_admission(gw: Gateway, exchange: Exchange, attempts: int = 8, first_delay: float = 0.1) -> None:
    """Free the slot, window entries and reservation of a request refused with 503 (bounded retries)."""
    assert gw.limiter is not None
    delay = first_delay
    for _ in range(attempts):
        try:
            await gw.limiter.cancel(user=exchange.principal.user, request_id=exchange.request_id,
                                    n=exchange.request.n, now_ms=exchange.started_ms)
            return
        except REDIS_ERRORS:
            gw.metrics.redis_errors.labels("cancel").inc()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    # Still unreachable: what admit may have written stays until its lease expires (upstream timeout + slack);
    # then it is recorded like a dead worker's request (settled: false, its estimate kept on the quota).
    log.error("could not undo the admission of request %s after %d attempts; its slot and reservation are held "
              "until the lease expires, then recorded unsettled", exchange.request_id, attempts)


async def keep_lease(gw: Gateway, exchange: Exchange) -> None:
    """Renew a running stream's lease every third of its length until cancelled (at its settle)."""
    if gw.limiter is None or exchange.admission is None:
        return
    while True:
        await asyncio.sleep(gw.limiter.lease_ms / 3000)
        try:
            await gw.limiter.renew(exchange.admission, time.time_ns() // 1_000_000)
        except REDIS_ERRORS:
            gw.metrics.redis_errors.labels("renew").inc()  # the next try comes well before the lease ends
