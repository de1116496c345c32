"""One request's life, top to bottom; every front door (generations, edits) calls ``handle``.

    authenticate -> prepare (read and validate the body) -> authorize the model -> admit (Redis)
      -> call the upstream -> relay (JSON or SSE) -> settle (metering, ledger)

The upstream call runs in a shielded background task: if the handler is cancelled (shutdown past
its grace period, a client gone as the reply arrives), the call still runs to its end and is
settled, so usage the upstream bills is never lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from gateway.auth.authenticator import Principal
from gateway.errors import GatewayError, ModelNotAllowed, ShuttingDown
from gateway.pipeline.admission import admit, keep_lease
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.gateway import Gateway
from gateway.pipeline.onbehalf import upstream_idempotency_key
from gateway.pipeline.request import ImageRequest
from gateway.tasks import spawn
from gateway.upstream.client import UpstreamReply
from gateway.upstream.delivery import ChunksResponse
from gateway.upstream.relay import StreamRelayResponse, read_whole_reply

Headers = list[tuple[bytes, bytes]]
_SSE_HEADERS: Headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                         (b"x-accel-buffering", b"no")]


@dataclass(frozen=True, slots=True)
class Arrival:
    """A request as it reached a front door: the HTTP request, its id, route and arrival time."""

    request: Request
    request_id: str
    route: str
    received: float  # monotonic seconds, for latency
    received_ms: int  # wall clock, for records and the usage periods


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated request, ready to be admitted: what limits and metering need, and what goes upstream."""

    image: ImageRequest
    body: bytes


Prepare = Callable[[Principal], Awaitable[Prepared]]


async def handle(gw: Gateway, arrival: Arrival, prepare: Prepare) -> Any:
    """Run one request through the pipeline; returns the ASGI response for the client."""
    rid = arrival.request_id
    model_label = "-"
    principal = None
    try:
        principal = await gw.authenticate(arrival.request)
        prepared = await prepare(principal)
        image = prepared.image
        model_label = image.model
        if principal.models is not None and image.model not in principal.models:
            raise ModelNotAllowed(f"This key may not use the model '{image.model}'.", param="model")
        exchange = Exchange(rid, principal, image, route=arrival.route, started=arrival.received,
                            started_ms=arrival.received_ms)
        limit_headers = await admit(gw, exchange)
    except GatewayError as err:
        gw.meter.refused(arrival.route, model_label, err, principal)
        return err.to_response(rid)
    return await call_upstream(gw, exchange, prepared.body, arrival.request, limit_headers)


async def call_upstream(gw: Gateway, exchange: Exchange, body: bytes, request: Request,
                        limit_headers: Headers) -> Any:
    """Send an admitted request upstream in a shielded task; the client gets its relay."""
    headers: Headers = [(b"x-request-id", exchange.request_id.encode()), *limit_headers]
    task = spawn(forward(gw, exchange, body, request, headers, limit_headers))
    try:
        outcome = await asyncio.shield(task)
    except asyncio.CancelledError:
        # The server is stopping past its grace period. The call goes on in the background and is settled;
        # the client gets an answer it will not blindly retry (the server's own would be a bare 500, which
        # SDKs retry: a second, billed, generation).
        task.add_done_callback(lambda t: _drain_orphaned_stream(t, gw, exchange))
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        return ShuttingDown().to_response(exchange.request_id)
    if isinstance(outcome, UpstreamReply):
        return _stream_relay(gw, exchange, outcome, [*_SSE_HEADERS, *headers])
    return outcome


def _stream_relay(gw: Gateway, exchange: Exchange, reply: UpstreamReply, headers: Headers) -> StreamRelayResponse:
    s = gw.settings
    return StreamRelayResponse(exchange, reply, headers, gw.meter.finish, s.upstream.timeout_seconds,
                               s.server.send_timeout_seconds, s.upstream.max_response_bytes,
                               renew=lambda ex: keep_lease(gw, ex))


def _drain_orphaned_stream(task: asyncio.Task[Any], gw: Gateway, exchange: Exchange) -> None:
    """A stream whose requester was cancelled as its reply arrived: read it to the end and settle it."""
    if not task.cancelled() and task.exception() is None and isinstance(task.result(), UpstreamReply):
        spawn(_stream_relay(gw, exchange, task.result(), []).drain_and_finish())


async def forward(gw: Gateway, exchange: Exchange, body: bytes, request: Request, headers: Headers,
                  limit_headers: Headers) -> Any:
    """The upstream call of an admitted request; finished (settled) exactly once unless it is a stream.

    Returns the stream's ``UpstreamReply`` (the relay finishes it), or the client's response.
    """
    rid = exchange.request_id
    try:
        idempotency_key = request.headers.get("idempotency-key")
        if idempotency_key is not None:
            idempotency_key = upstream_idempotency_key(exchange.principal.user, idempotency_key)
        reply = await gw.upstream.send(body, request.headers, rid, idempotency_key=idempotency_key)
        if exchange.request.stream and reply.is_event_stream:
            return reply
        settings = gw.settings
        chunks = await read_whole_reply(exchange, reply, settings.upstream.timeout_seconds,
                                        settings.upstream.max_response_bytes)
        exchange.status = reply.response.status
        content_type = reply.response.headers.get("content-type", "application/json").encode()
        response: Any = ChunksResponse(reply.response.status, chunks, [(b"content-type", content_type), *headers],
                                       settings.server.send_timeout_seconds)
    except GatewayError as err:
        exchange.status = err.status
        exchange.error_reason = exchange.error_reason or err.code
        err.headers.update((k.decode(), v.decode()) for k, v in limit_headers)  # x-ratelimit-*: admitted
        response = err.to_response(rid)
    except Exception:
        exchange.status, exchange.error_reason = 500, "internal_error"
        await gw.meter.finish(exchange)
        raise
    await gw.meter.finish(exchange)
    return response
