"""Job routes: ``GET`` and ``DELETE /v1/images/jobs/{id}`` (SPEC section 10), for the submitting user only."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.http.context import gateway_of, request_id_of
from gateway.jobs.control import cancel_job
from gateway.jobs.model import Job
from gateway.jobs.results import job_object
from gateway.pipeline.gateway import Gateway


async def _own_job(gw: Gateway, request: Request) -> Job:
    """The job named in the path, if the caller's user owns it; anyone else gets 404 (no probing)."""
    principal = await gw.authenticate(request)
    job_id = request.path_params["job_id"]
    job = None if gw.jobs is None else await gw.jobs.get(principal.user, job_id)
    if job is None:
        raise NotFound(f"No job with id '{job_id}'.", param="id")
    return job


async def get_job(request: Request) -> Response:
    """``GET /v1/images/jobs/{id}``."""
    gw = gateway_of(request)
    try:
        job = await _own_job(gw, request)
        return JSONResponse(await job_object(gw.image_store, job))
    except GatewayError as err:
        return err.to_response(request_id_of(request))


async def delete_job(request: Request) -> Response:
    """``DELETE /v1/images/jobs/{id}``: cancels a queued job (a started one: 400); answers the job."""
    gw = gateway_of(request)
    try:
        job = await _own_job(gw, request)
        if gw.jobs is None or not await cancel_job(gw.jobs, gw.limiter, gw.keystore, job, gw.image_store):
            raise InvalidRequest(f"The job is {job.status} and can no longer be cancelled.", param="id")
        gw.metrics.jobs.labels("cancelled").inc()
        fresh = await gw.jobs.get(job.user, job.id)
        return JSONResponse(await job_object(gw.image_store, fresh or job))
    except GatewayError as err:
        return err.to_response(request_id_of(request))
