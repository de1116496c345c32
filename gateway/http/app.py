"""The ASGI app: ``create_app(settings, ...)`` builds it; clients are opened in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route

from gateway.admin.keys_api import ADMIN_ROUTES
from gateway.admin.usage_api import USAGE_ROUTES
from gateway.config import Settings, load_settings
from gateway.console.routes import CONSOLE_ROUTES
from gateway.errors import GatewayError
from gateway.http import system
from gateway.http.images import create_image, edit_image
from gateway.http.jobs import delete_job, get_job
from gateway.http.middleware import ImageRoutes, RequestIdMiddleware
from gateway.jobs.service import run_jobs
from gateway.jobs.submit import JOBS_PATH
from gateway.malloc import tune_malloc
from gateway.metering import buffered_values
from gateway.metering.metrics import Metrics
from gateway.pipeline.gateway import open_gateway
from gateway.pipeline.request import EDITS, GENERATIONS
from gateway.tasks import drain_background_tasks

ROUTES = [
    Route(GENERATIONS, create_image, methods=["POST"]),
    Route(EDITS, edit_image, methods=["POST"]),
    Route(JOBS_PATH + "/{job_id}", get_job, methods=["GET"]),
    Route(JOBS_PATH + "/{job_id}", delete_job, methods=["DELETE"]),
    Route("/v1/models", system.list_models, methods=["GET"]),
    Route("/healthz", system.healthz, methods=["GET"]),
    Route("/readyz", system.readyz, methods=["GET"]),
    Route("/metrics", system.metrics, methods=["GET"]),
]


def create_app(settings: Settings, *, registry: CollectorRegistry | None = None,
               session: aiohttp.ClientSession | None = None, redis: Any = None) -> Starlette:
    """The gateway app. Tests may pass a metrics registry, an aiohttp session or a Redis client."""
    metrics = Metrics(registry, user_label=settings.metrics.user_label)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        # Outermost: its last flush comes after everything below has counted (settlements at close).
        async with buffered_values.flushing(settings.metrics.flush_seconds):
            gw = await open_gateway(settings, metrics, session=session, redis=redis)
            jobs = asyncio.create_task(run_jobs(gw))  # this worker's job runner and webhook sender
            try:
                yield {"gateway": gw}
            finally:
                jobs.cancel()  # jobs already calling the upstream finish in the drain below
                await asyncio.gather(jobs, return_exceptions=True)
                await drain_background_tasks(grace_seconds=settings.upstream.timeout_seconds)
                await gw.close()

    routes: list[BaseRoute] = [*ROUTES, *ADMIN_ROUTES, *USAGE_ROUTES, *CONSOLE_ROUTES]
    # Plain Starlette: FastAPI's extra layers (body-limit, telemetry, exit-stack middleware) cost on
    # every request and serve nothing here (no dependency injection, no OpenAPI docs).
    # The image routes stay in ROUTES (the router still answers their 405s); ImageRoutes takes their POSTs.
    return Starlette(routes=routes, lifespan=lifespan,
                     middleware=[Middleware(RequestIdMiddleware, metrics_of=lambda: metrics),
                                 Middleware(ImageRoutes, handlers={GENERATIONS: create_image, EDITS: edit_image})],
                     exception_handlers={GatewayError: system.gateway_error, Exception: system.internal_error,
                                         404: system.not_found, 405: system.not_found})


# CPython's defaults (700, 10, 10) collect the young generation every 700 allocations and the whole heap
# whenever what survived grew by a quarter. A burst holds thousands of requests' objects alive for seconds,
# so every one of them survives, and full collections ran over all of them again and again: 4.9 s of a
# 5,000-request burst's 10 s of worker CPU (gc.callbacks), the requests waiting meanwhile.
GC_THRESHOLDS = (50_000, 20, 10)


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory`` (each worker loads the config named by GATEWAY_CONFIG)."""
    configure_logging()
    tune_gc()
    tune_malloc()
    return create_app(load_settings())


def tune_gc() -> None:
    """A serving worker's collector: what the imports made is frozen (never scanned again), and the
    thresholds are ``GC_THRESHOLDS``. Only in a worker: an app created in-process leaves its host's GC alone."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def configure_logging() -> None:
    """The gateway's own INFO lines (key changes, disconnects, spool replays) on stderr, like uvicorn's."""
    logger = logging.getLogger("gateway")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
