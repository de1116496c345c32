"""The admin API for usage (SPEC §6): period totals and the streamed record export.

``GET /admin/usage?user=U&period=YYYY-MM-DD|YYYY-MM`` reads the day or month aggregate hash
(one HGETALL). ``GET /admin/usage/records?from=ISO&to=ISO[&user=U][&format=jsonl|csv]``
streams the ledger records whose ``time`` is in ``[from, to)`` (see ``gateway.metering.ledger``):
user by user in name order, each user's records in settle order, read page by page.
Both take the admin token (``admin.require_admin``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.admin.keys_api import require_admin
from gateway.admin.queries import MEDIA_TYPES, parse_format, parse_range, parse_user
from gateway.errors import InvalidRequest, MissingParameter, ServiceUnavailable
from gateway.http.context import gateway_of
from gateway.metering.ledger import export_lines, iter_records, period_totals
from gateway.redisdb.client import REDIS_ERRORS
from gateway.redisdb.keys import RedisKeys

log = logging.getLogger("gateway.admin")

def _required(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if not value:
        raise MissingParameter(f"Missing required parameter: '{name}'.", param=name)
    return value


def _redis(request: Request) -> tuple[Any, RedisKeys]:
    gw = gateway_of(request)
    if gw.redis is None:
        raise ServiceUnavailable("The gateway's usage store is not configured.")
    return gw.redis, RedisKeys(gw.settings.redis.key_prefix)


async def usage_totals(request: Request) -> Response:
    await require_admin(request)
    user = parse_user(request.query_params.get("user"), required=True)
    assert user is not None
    period = _required(request, "period")
    client, keys = _redis(request)
    try:
        totals = await period_totals(client, keys, user, period)
    except ValueError:
        raise InvalidRequest("'period' must be a UTC day YYYY-MM-DD or month YYYY-MM.",
                             param="period") from None
    except REDIS_ERRORS as exc:
        gateway_of(request).metrics.redis_errors.labels("usage").inc()
        raise ServiceUnavailable("The gateway's usage store is unavailable; try again shortly.") from exc
    return JSONResponse(totals)


async def usage_records(request: Request) -> Response:
    await require_admin(request)
    start_ms, end_ms = parse_range(_required(request, "from"), _required(request, "to"))
    user = parse_user(request.query_params.get("user"), required=False)
    fmt = parse_format(request.query_params.get("format"))
    client, keys = _redis(request)
    metrics = gateway_of(request).metrics

    async def body() -> AsyncIterator[bytes]:
        try:
            async for line in export_lines(iter_records(client, keys, start_ms, end_ms, user=user), fmt):
                yield line
        except REDIS_ERRORS:
            # Headers are gone already: ending the chunked body early tells the client it is incomplete.
            metrics.redis_errors.labels("usage").inc()
            log.exception("usage export aborted by a Redis error")
            raise

    return StreamingResponse(body(), media_type=MEDIA_TYPES[fmt], headers={"cache-control": "no-store"})


USAGE_ROUTES = [
    Route("/admin/usage", usage_totals, methods=["GET"]),
    Route("/admin/usage/records", usage_records, methods=["GET"]),
]
