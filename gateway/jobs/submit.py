"""Submitting a job: ``Prefer: respond-async`` on generations or edits (SPEC section 10).

The request goes through the pipeline's own stages (authenticate, validate, authorize the model),
then, instead of the upstream call: its quotas are reserved (a refusal is the usual 429
``insufficient_quota``, final), an edit's files go to the image store (``inputs.py``), and the job
is stored and queued; the answer is 202 at once.
Per-minute and concurrency limits are not checked here: they pace the job when it runs.
"""

from __future__ import annotations

import contextlib
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway.errors import InvalidRequest, ServiceUnavailable, StorageUnavailable
from gateway.jobs.inputs import discard, keep_edit
from gateway.jobs.model import Job, new_job_id, now_ms
from gateway.pipeline.admission import admit, cancel_admission
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.gateway import Gateway
from gateway.pipeline.lifecycle import Headers, Prepared
from gateway.redisdb.client import REDIS_ERRORS
from gateway.upstream.form_body import FormBody

JOBS_PATH = "/v1/images/jobs"


def wants_async(request: Request) -> bool:
    """True when the client asked ``Prefer: respond-async`` (RFC 7240; among other preferences too)."""
    prefs = ",".join(request.headers.getlist("prefer")).lower()
    return any(p.split(";")[0].strip() == "respond-async" for p in prefs.split(","))


async def reserve(gw: Gateway, exchange: Exchange) -> Headers:
    """The submission's admission: the job's quotas reserved under its id (``admit.lua`` reserve mode)."""
    if gw.image_store is None or gw.jobs is None:
        raise InvalidRequest("Asynchronous jobs (Prefer: respond-async) need the image store, and this gateway "
                             "has none configured (storage.endpoint_url).", param=None)
    if exchange.request.stream:
        raise InvalidRequest("'stream' cannot be combined with Prefer: respond-async.", param="stream")
    exchange.request_id = new_job_id()
    headers = await admit(gw, exchange, mode="reserve")
    if exchange.admission is None:  # Redis down and policy allow: a job cannot be kept without Redis
        raise ServiceUnavailable("The gateway's job store is unavailable; try again shortly.")
    return headers


async def _keep_files(gw: Gateway, exchange: Exchange, form: FormBody) -> bytes:
    """An edit's files to the image store, noted first in Redis: what a failed store or a worker that died
    mid-upload leaves behind is deleted by a runner after ``jobs.upload_grace_seconds`` (``runner.py``)."""
    assert gw.jobs is not None and gw.image_store is not None
    try:
        await gw.jobs.uploading(exchange.principal.user, exchange.request_id)
        return await keep_edit(gw.image_store, exchange.request_id, form)
    except REDIS_ERRORS as exc:
        gw.metrics.redis_errors.labels("jobs").inc()
        await cancel_admission(gw, exchange)
        raise ServiceUnavailable("The gateway's job store is unavailable; try again shortly.") from exc
    except StorageUnavailable:
        await cancel_admission(gw, exchange)
        raise


async def enqueue(gw: Gateway, exchange: Exchange, prepared: Prepared, limit_headers: Headers) -> Any:
    """Store and queue the admitted job; 202 with its ``Location``."""
    assert gw.jobs is not None and gw.image_store is not None and exchange.admission is not None
    p, image = exchange.principal, exchange.request
    # A generation keeps its validated JSON; an edit keeps where its files went in the image store.
    body = prepared.body if isinstance(prepared.body, bytes) else await _keep_files(gw, exchange, prepared.body)
    job = Job(id=exchange.request_id, user=p.user, team=p.team, key_id=p.key_id, plan=p.plan, limits=p.limits,
              models=None if p.models is None else tuple(sorted(p.models)), route=exchange.route,
              body=body, n=image.n, model=image.model, created_ms=now_ms(),
              day=exchange.admission.day, month=exchange.admission.month)
    try:
        await gw.jobs.submit(job)
    except REDIS_ERRORS as exc:
        gw.metrics.redis_errors.labels("jobs").inc()
        await cancel_admission(gw, exchange)  # the reservation of a job that was never queued
        await discard(gw.image_store, job.route, job.body)
        raise ServiceUnavailable("The gateway's job store is unavailable; try again shortly.") from exc
    if not isinstance(prepared.body, bytes):
        with contextlib.suppress(*REDIS_ERRORS):  # left: a runner finds the job and only drops the note
            await gw.jobs.uploaded(p.user, job.id)
    gw.metrics.jobs.labels("submitted").inc()
    gw.metrics.requests.labels(exchange.route, image.model, "202").inc()
    headers = {"location": f"{JOBS_PATH}/{job.id}",
               **{k.decode(): v.decode() for k, v in limit_headers}}
    return JSONResponse({"id": job.id, "object": "image.job", "status": job.status,
                         "created_at": job.created_ms // 1000}, status_code=202, headers=headers)
