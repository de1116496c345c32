"""The job runner, one per worker: picks jobs fairly across users, paces them, runs them to the end.

Each round goes once over the users with unfinished jobs, starting one further along each
time, and takes at most one new job per user: a user with 1,000 queued jobs gets one start per
round like a user with one. A job is paced by the user's own limits: it is admitted through
``admit.lua`` in ``pace`` mode (per-minute and concurrency limits, shared with synchronous
requests) and waits while they refuse; a user with a job waiting is skipped until it starts.
Its quotas were reserved at submission. Then the pipeline's own stages run it
(``lifecycle.run_detached``: upstream call with the job's Idempotency-Key, metering with the
job id as request id), the images go to the store, and the stream entry is acknowledged.

A runner renews its claim on the entries it holds; when a worker dies its entries go idle and
another runner takes them over after ``jobs.visibility_timeout_seconds`` and runs them again:
the same Idempotency-Key goes upstream, and the settle marker bills the job once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from dataclasses import replace
from typing import Any

import orjson

from gateway.errors import GatewayError, RateLimited, StorageUnavailable
from gateway.imagestore.store import ImageStore
from gateway.jobs.inputs import InputsGone, discard, load
from gateway.jobs.model import FAILED, FINISHED, IN_PROGRESS, QUEUED, SUCCEEDED, Job, now_ms
from gateway.jobs.queue import Entry, JobQueue
from gateway.jobs.results import store_images
from gateway.limits.limiter import Admission
from gateway.metering.pricing import estimate
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.gateway import Gateway
from gateway.pipeline.lifecycle import run_detached
from gateway.pipeline.onbehalf import upstream_idempotency_key
from gateway.redisdb.client import REDIS_ERRORS
from gateway.tasks import spawn

log = logging.getLogger("gateway.jobs")
_MAX_WAIT = 1.0  # a paced job looks again at least this often (a slot may free on another replica)


class Runner:
    """Runs queued jobs in this worker; ``run()`` until cancelled."""

    def __init__(self, gw: Gateway, queue: JobQueue, store: ImageStore, on_finished: Any = None) -> None:
        self.gw = gw
        self.queue = queue
        self.store = store
        self.on_finished = on_finished  # called with each finished Job (webhooks)
        self.settings = gw.settings.jobs
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.held: dict[str, Entry] = {}  # entry id -> entry this runner works on (paced or running)
        self.pacing: set[str] = set()  # users with a job of this runner waiting for their limits
        self.tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()  # a job of this runner finished or started: look again now
        self._round = 0
        self._next_takeover = 0.0

    async def run(self) -> None:
        """Take and start jobs until cancelled; then stop the paced ones (running ones are drained)."""
        renewer = asyncio.create_task(self._renew_forever())
        collector = asyncio.create_task(self._collect_uploads_forever())
        try:
            while True:
                try:
                    started = await self._one_round()
                except REDIS_ERRORS:
                    self.gw.metrics.redis_errors.labels("jobs").inc()
                    started = 0
                if not started:
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), self.settings.poll_seconds)
        finally:
            renewer.cancel()
            collector.cancel()
            for task in list(self.tasks):
                task.cancel()

    async def _one_round(self) -> int:
        users = await self.queue.users()
        if not users:
            return 0
        self._round += 1
        start = self._round % len(users)
        takeover = time.monotonic() >= self._next_takeover
        if takeover:
            self._next_takeover = time.monotonic() + self.settings.visibility_timeout_seconds / 4
        started = 0
        for user in users[start:] + users[:start]:
            if len(self.held) - len(self.pacing) >= self.settings.concurrency:
                break
            idle_ms = int(self.settings.visibility_timeout_seconds * 1000)
            entry = None
            if takeover:  # now and then: names of runners that ended, holding nothing; then their jobs
                await self.queue.prune(user, idle_ms)
                # Before new jobs, and even while one of the user's jobs waits for a slot: a dead runner's
                # jobs may hold those slots (their leases outlive the visibility timeout) and keep them.
                entry = await self.queue.take_over(user, self.consumer, idle_ms)
            if entry is None:
                if user in self.pacing:
                    continue
                entry = await self.queue.read(user, self.consumer)
            if entry is None:
                await self.queue.forget_if_empty(user)
                continue
            self.held[entry.entry_id] = entry
            self.pacing.add(user)  # until admitted: one waiting job per user and runner
            task = asyncio.create_task(self._run(entry))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            started += 1
        return started

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.visibility_timeout_seconds / 4)
            by_user: dict[str, list[str]] = {}
            for entry in list(self.held.values()):
                by_user.setdefault(entry.user, []).append(entry.entry_id)
            for user, ids in by_user.items():
                try:
                    await self.queue.renew(user, self.consumer, ids)
                except REDIS_ERRORS:
                    self.gw.metrics.redis_errors.labels("jobs").inc()

    async def _collect_uploads_forever(self) -> None:
        """Delete the files of edit submissions that never became jobs (the store failed, a worker died)."""
        grace_ms = int(self.settings.upload_grace_seconds * 1000)
        while True:
            await asyncio.sleep(min(max(self.settings.upload_grace_seconds / 4, 0.5), 60.0))
            try:
                for user, job_id in await self.queue.stale_uploads(grace_ms):
                    if await self.queue.get(user, job_id) is None:
                        await self.store.delete_prefix(f"jobs/{job_id}/")
                    await self.queue.uploaded(user, job_id)
            except REDIS_ERRORS:
                self.gw.metrics.redis_errors.labels("jobs").inc()
            except StorageUnavailable:
                pass  # logged by the store; the next round tries again

    async def _run(self, entry: Entry) -> None:
        try:
            job = await self.queue.get(entry.user, entry.job_id)
            if job is None or job.status in FINISHED:  # expired, or cancelled while queued
                await self.queue.done(entry)
                if job is not None:
                    await discard(self.store, job.route, job.body)
                return
            admission = await self._pace(job)
            self.pacing.discard(entry.user)
            self._changed.set()
            started = await self.queue.transition(job.user, job.id, (QUEUED, IN_PROGRESS), status=IN_PROGRESS,
                                                  started_ms=admission.now_ms, attempts=job.attempts + 1)
            if not started:  # cancelled while it waited: give back the slot pacing took
                assert self.gw.limiter is not None
                await self.gw.limiter.drop_lease(job.user, job.id)
                await self.queue.done(entry)
                await discard(self.store, job.route, job.body)
                return
            # From here the upstream may bill: a shutdown waits for it (gateway/tasks.py) instead of cancelling.
            await asyncio.shield(spawn(self._execute(entry, job, admission)))
        except asyncio.CancelledError:
            raise
        except StorageUnavailable:  # logged (without a traceback) by the store; an outage is no bug
            log.warning("job %s of %s: the image store is unavailable; it runs again after %g s", entry.job_id,
                        entry.user, self.settings.visibility_timeout_seconds)
        except Exception:
            # Left pending: another runner takes it over after the visibility timeout.
            log.exception("job %s of %s failed in the runner; it will be retried", entry.job_id, entry.user)
        finally:
            self.pacing.discard(entry.user)
            self.held.pop(entry.entry_id, None)
            self._changed.set()

    async def _pace(self, job: Job) -> Admission:
        """Admit the job against the user's per-minute and concurrency limits, waiting while they refuse."""
        assert self.gw.limiter is not None
        while True:
            now = now_ms()
            try:
                admission = await self.gw.limiter.admit(
                    user=job.user, limits=job.limits, request_id=job.id, n=job.n, est_tokens=0, est_usd_micros=0,
                    now_ms=now, mode="pace")
                # Usage counts in the period its quota was reserved in (at submission).
                return replace(admission, day=job.day, month=job.month)
            except RateLimited as err:
                wait = int(err.headers.get("retry-after-ms", "1000")) / 1000
            except REDIS_ERRORS:
                self.gw.metrics.redis_errors.labels("admit").inc()
                wait = _MAX_WAIT
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(max(wait, 0.01), _MAX_WAIT))

    async def _execute(self, entry: Entry, job: Job, admission: Admission) -> None:
        """Run an admitted job through the pipeline's upstream stage and keep its result."""
        gw = self.gw
        try:
            request = await load(self.store, gw.settings, job.route, job.body)
        except GatewayError as err:
            assert gw.limiter is not None
            if isinstance(err, StorageUnavailable) and not isinstance(err, InputsGone):
                # The store is down: left pending, run again after the visibility timeout. Only the slot
                # pacing took is given back; releasing the admission would settle the job as done.
                await gw.limiter.drop_lease(job.user, job.id)
                raise
            await gw.limiter.release(admission)
            # The config changed since submission (a model disabled), or an edit's files expired.
            await self._finish(entry, job, FAILED, error=err.body()["error"])
            return
        try:
            exchange = Exchange(job.id, job.principal(), request.image, route=job.route, started=time.monotonic(),
                                started_ms=admission.now_ms)
            exchange.estimate = estimate(gw.settings.models[request.image.model], request.image)
            exchange.admission = admission
            key = upstream_idempotency_key(job.user, f"job:{job.id}")
            status, answer = await run_detached(gw, exchange, request.body, key, request.path)
        finally:
            request.close()
        if 200 <= status < 300:
            result = await store_images(self.store, answer)
            await self._finish(entry, job, SUCCEEDED, result=result)
        else:
            await self._finish(entry, job, FAILED, error=_error_of(status, answer))

    async def _finish(self, entry: Entry, job: Job, status: str, *, result: Any = None, error: Any = None) -> None:
        done = now_ms()
        finished = await self.queue.transition(
            job.user, job.id, (QUEUED, IN_PROGRESS), status=status, completed_ms=done,
            result=orjson.dumps(result) if result is not None else None,
            error=orjson.dumps(error) if error is not None else None)
        await self.queue.done(entry)
        await discard(self.store, job.route, job.body)
        if not finished:  # another runner took the job over while this one stalled, and finished it first
            return
        self.gw.metrics.jobs.labels(status).inc()
        job.status, job.completed_ms, job.result, job.error = status, done, result, error
        if self.on_finished is not None:
            try:
                await self.on_finished(job)
            except (*REDIS_ERRORS, GatewayError):  # type: ignore[misc]
                log.error("job %s finished but its webhook could not be scheduled (Redis unavailable)", job.id)


def _error_of(status: int, answer: bytes) -> dict[str, Any]:
    """The OpenAI error object of a failed call (the upstream's own when it sent one)."""
    with contextlib.suppress(ValueError, TypeError):
        body = orjson.loads(answer)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return body["error"]  # type: ignore[no-any-return]
    return {"message": f"The upstream answered {status}.", "type": "server_error", "param": None,
            "code": "upstream_error"}
