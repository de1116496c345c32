"""Cancelling a job that has not started: shared by ``DELETE /v1/images/jobs/{id}`` and ``gateway jobs cancel``."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.jobs.inputs import discard
from gateway.jobs.model import FAILED, QUEUED, Job, now_ms
from gateway.jobs.queue import JobQueue
from gateway.jobs.webhooks import schedule

CANCELLED = {"message": "The job was cancelled before it started.", "type": "invalid_request_error",
             "param": None, "code": "job_cancelled"}


async def cancel_job(queue: JobQueue, limiter: Any, keystore: Any, job: Job, store: Any = None) -> bool:
    """Fail a queued job as cancelled, give its quota reservation back, and schedule its webhook.

    False (nothing changed) if it had started. An edit's stored files are deleted now when ``store`` is
    given (the API), else by the runner that reads the job's stream entry (which stays until then).
    """
    if not await queue.transition(job.user, job.id, (QUEUED,), status=FAILED, completed_ms=now_ms(),
                                  error=orjson.dumps(CANCELLED)):
        return False
    if limiter is not None:
        # At the submission's instant: the reservation is released in the day and month it was made in.
        await limiter.cancel(user=job.user, request_id=job.id, n=job.n, now_ms=job.created_ms)
    await schedule(keystore, queue, job)
    await discard(store, job.route, job.body)
    return True
