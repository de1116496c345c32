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
from gateway.idempotency.bodies import StoreBodies
from gateway.idempotency.service import Idempotency
from gateway.idempotency.store import IdempotencyStore
from gateway.imagestore.store import ImageStore
from gateway.jobs.queue import JobQueue
from gateway.limits.limiter import Limiter
from gateway.metering.meter import Meter
from gateway.metering.metrics import Metrics
from gateway.metering.settle_queue import SettleQueue, Spool
from gateway.metering.sweeper import LeaseSweeper
from gateway.pipeline.intake import Intake
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
                 idempotency: Idempotency | None = None, jobs: JobQueue | None = None,
                 image_store: ImageStore | None = None,
                 sweeper: LeaseSweeper | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.upstream = upstream
        self.redis = redis
        self.limiter = limiter
        self.keystore = keystore
        self.guard = guard
        self.jobs = jobs  # the asynchronous job queue (needs Redis)
        self.image_store = image_store  # gateway/imagestore (None: no store configured)
        self.jobs_summary: Any = None  # the job queue's depth and age, refreshed by gateway/jobs/service.py
        self.auth = auth or Authenticator(settings, store=keystore)
        self.meter = meter or Meter(settings, metrics, limiter)
        self.health = health
        self.pipeline_redis = pipeline_redis  # the batcher's client, when it is not ``redis``
        self.idempotency = idempotency  # None: Idempotency-Key is not honoured (no Redis)
        self.sweeper = sweeper
        # Requests between admission and their upstream call: a few at a time, in arrival order.
        self.intake = Intake(settings.server.intake_concurrency, settings.redis.admission_queue)

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
        if self.image_store is not None:
            await self.image_store.close()
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
    image_store = await _open_image_store(settings, metrics)
    # Large stored answers go to the image store when there is one; otherwise they stay in Redis.
    bodies = StoreBodies(image_store) if image_store is not None else None
    # An Idempotency-Key held by a dead worker is taken over after the same lease; waiters outlast it.
    idempotency = Idempotency(IdempotencyStore(redis, redis_keys, ttl_seconds=settings.idempotency.ttl_seconds,
                                               bodies=bodies),
                              metrics, lease_seconds=lease_seconds, wait_seconds=lease_seconds + 30,
                              serve_unguarded=settings.redis.on_unavailable == "allow")
    # Leases that expire unsettled (a worker died) are recorded even if their user sends nothing more.
    sweeper = LeaseSweeper(limiter, redis, redis_keys, interval_seconds=settings.limits.sweep_interval_seconds,
                           static_users={k.user for k in settings.keys}, metrics=metrics)
    sweeper.start()
    jobs = JobQueue(redis, redis_keys, ttl_seconds=settings.jobs.ttl_seconds)
    return Gateway(settings, metrics=metrics, upstream=upstream, redis=redis, keystore=keystore, guard=guard,
                   limiter=limiter, meter=meter, health=health, pipeline_redis=pipeline_redis,
                   idempotency=idempotency, jobs=jobs, image_store=image_store, sweeper=sweeper)


async def _open_image_store(settings: Settings, metrics: Metrics) -> ImageStore | None:
    """The image store of ``storage:``, started (bucket created); None without one."""
    if not settings.storage.enabled:
        return None
    store = ImageStore(settings.storage, metrics)
    await store.start()
    return store
