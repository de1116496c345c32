"""A worker's job services, started in the app's lifespan: the runner, the webhook sender, the queue gauges."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from gateway.jobs.runner import Runner
from gateway.jobs.webhooks import Webhooks
from gateway.pipeline.gateway import Gateway
from gateway.redisdb.client import REDIS_ERRORS

log = logging.getLogger("gateway.jobs")
GAUGE_SECONDS = 5.0


async def run_jobs(gw: Gateway) -> None:
    """Run jobs and refresh the queue gauges until cancelled; nothing without a job queue and a store."""
    if gw.jobs is None or gw.image_store is None:
        return
    webhooks = Webhooks(gw, gw.jobs)
    runner = Runner(gw, gw.jobs, gw.image_store, on_finished=webhooks.finished)
    await asyncio.gather(runner.run(), webhooks.run(), _gauges(gw))


@dataclass(frozen=True, slots=True)
class JobsSummary:
    """The queue as the admin console's live page shows it (``gw.jobs_summary``)."""

    queued: int
    oldest_age_seconds: int


async def _gauges(gw: Gateway) -> None:
    assert gw.jobs is not None
    while True:
        with contextlib.suppress(*REDIS_ERRORS):
            queued, oldest = await gw.jobs.waiting()
            gw.metrics.jobs_queued.set(queued)
            gw.metrics.jobs_oldest_age.set(oldest)
            gw.jobs_summary = JobsSummary(queued, round(oldest))
        await asyncio.sleep(GAUGE_SECONDS)
