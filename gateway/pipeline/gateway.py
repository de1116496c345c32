"""The worker's components, wired once in the app's lifespan: one ``Gateway`` per worker."""

from __future__ import annotations

import contextlib
from typing import Any

import aiohttp
from starlette.requests import Request

from gateway.auth.authenticator import Authenticator, Principal
from gateway.auth.guard import AuthGuard
from gateway.auth.keystore import KeyStore
from gateway.config import Settings
from gateway.limits.limiter import Limiter
from gateway.metering.meter import Meter
from gateway.metering.metrics import Metrics
from gateway.metering.settle_queue import SettleQueue, Spool
from gateway.metering.sweeper import LeaseSweeper
from gateway.redisdb.batcher import Batcher
from gateway.redisdb.client import REDIS_ERRORS, open_pipeline_redis, open_redis
from gateway.redisdb.health import Health
from gateway.redisdb.keys import RedisKeys
from gateway.upstream.client import UpstreamClient


class Gateway:
    """Everything a request needs: settings, clients, limiter, meter. One per worker."""

    def __init__(self, settings: Settings, *, metrics: Metrics, upstream: UpstreamClient, redis: Any = None,
                 limiter: Limiter | None = None, auth: Authenticator | None = None, meter: Meter | None = None,
                 keystore: KeyStore | None = None, guard: AuthGuard | None = None,
                 health: Health | None = None, pipeline_redis: Any = None,
                 sweeper: LeaseSweeper | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.upstream = upstream
        self.redis = redis
        self.limiter = limiter
        self.keystore = keystore
        self.guard = guard
        self.auth = auth or Authenticator(settings, store=keystore)
        self.meter = meter or Meter(settings, metrics, limiter)
        self.health = health
        self.pipeline_redis = pipeline_redis  # the batcher's client, when it is not ``redis``
        self.sweeper = sweeper

    async def authenticate(self, request: Request) -> Principal:
        """The caller's Principal; failures count toward the brute-force guard (a good key costs nothing)."""
        authorization = request.headers.get("authorization")
        if self.guard is None:
            return await self.auth.authenticate(authorization)
        return await self.guard.authenticate(request, lambda: self.auth.authenticate(authorization))

    async def not_ready_reason(self) -> str | None:
        if self.redis is None:
            return None
        if self.health is not None and self.health.open:
            return f"redis unavailable ({self.health.reason})"
        try:
            await self.redis.ping()
        except REDIS_ERRORS as exc:
            self.metrics.redis_errors.labels("ping").inc()
            return f"redis unavailable ({type(exc).__name__})"
        return None

    async def close(self) -> None:
        if self.sweeper is not None:
            await self.sweeper.stop()
        await self.meter.close()
        if self.limiter is not None:
            await self.limiter.batcher.close()
        if self.health is not None:
            await self.health.close()
        await self.upstream.close()
        if self.redis is not None:
            await self.redis.aclose()
        if self.pipeline_redis is not None:
            await self.pipeline_redis.aclose()


async def open_gateway(settings: Settings, metrics: Metrics, *, session: aiohttp.ClientSession | None = None,
                       redis: Any = None) -> Gateway:
    """Open the worker's clients (upstream, Redis) and wire the components together."""
    upstream = UpstreamClient(settings.upstream, session=session)
    await upstream.start()
    pipeline_redis = None
    if redis is None:
        redis, pipeline_redis = open_redis(settings.redis), open_pipeline_redis(settings.redis)
        if settings.redis.cluster:
            # Load the slot map first: without it redis-py 8 sends early commands to the wrong node
            # and breaks connections still opening while it re-maps. Unreachable now: it maps lazily later.
            for client in (redis, pipeline_redis):
                with contextlib.suppress(*REDIS_ERRORS):
                    await client.initialize()
    rs = settings.redis
    batch_client = pipeline_redis or redis
    health = Health(batch_client.ping, interval=rs.health_interval_seconds, timeout=rs.health_timeout_seconds,
                    failures=rs.health_failures)
    batcher = Batcher(batch_client, connections=rs.pipeline_connections, max_queue=rs.admission_queue,
                      health=health)
    health.start()
    redis_keys = RedisKeys(settings.redis.key_prefix)
    keystore = KeyStore(redis, redis_keys, settings, metrics=metrics)
    guard = AuthGuard(redis, redis_keys, settings.auth, metrics)
    # A slot or reservation whose worker died expires one upstream timeout (plus slack) after admission.
    lease_seconds = settings.upstream.timeout_seconds + settings.limits.lease_slack_seconds
    limiter = Limiter(redis, redis_keys, lease_ms=int(lease_seconds * 1000),
                      ledger_maxlen=settings.usage.stream_maxlen, batcher=batcher)
    # Metering: settlements Redis refuses are retried in the background, spooled at shutdown, replayed here.
    settler = SettleQueue(limiter, metrics, redis=redis, keys=redis_keys,
                          max_size=settings.usage.settle_queue_size, spool=Spool(settings.usage.spool_path))
    meter = Meter(settings, metrics, limiter, settler=settler)
    await meter.start()
    # Leases that expire unsettled (a worker died) are recorded even if their user sends nothing more.
    sweeper = LeaseSweeper(limiter, redis, redis_keys, interval_seconds=settings.limits.sweep_interval_seconds,
                           static_users={k.user for k in settings.keys}, metrics=metrics)
    sweeper.start()
    return Gateway(settings, metrics=metrics, upstream=upstream, redis=redis, keystore=keystore, guard=guard,
                   limiter=limiter, meter=meter, health=health, pipeline_redis=pipeline_redis, sweeper=sweeper)
