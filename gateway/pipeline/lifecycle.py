"""One request's life, top to bottom; every front door (generations, edits) calls ``handle``.

    authenticate -> prepare (read and validate the body) -> authorize the model -> admit (Redis)
      -> call the upstream -> relay (JSON or SSE) -> settle (metering, ledger)

With an ``Idempotency-Key`` (gateway/idempotency/), the key is claimed before admission: a repeat
gets the stored answer instead (not admitted, not metered), and the runner's answer is kept once
the upstream may have billed it, or the claim released when the gateway refused the request itself.

The upstream call runs in a shielded background task: if the handler is cancelled (shutdown past
its grace period, a client gone as the reply arrives), the call still runs to its end and is
settled, so usage the upstream bills is never lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request

from gateway.auth.authenticator import Principal
from gateway.errors import GatewayError, ModelNotAllowed, ShuttingDown, StorageUnavailable, UpstreamError
from gateway.idempotency.answers import Answer, answer_of, answer_of_error, may_have_billed, replay_response
from gateway.idempotency.fingerprint import body_fingerprint
from gateway.idempotency.header import idempotency_key
from gateway.idempotency.service import Ticket
from gateway.imagestore.responses import images_as_urls
from gateway.pipeline.admission import admit, enter_intake, keep_lease
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.gateway import Gateway
from gateway.pipeline.onbehalf import upstream_idempotency_key
from gateway.pipeline.request import ImageRequest, stored_as_urls
from gateway.tasks import spawn
from gateway.upstream.client import GENERATIONS_PATH, UpstreamReply
from gateway.upstream.delivery import ChunksResponse
from gateway.upstream.form_body import FormBody
from gateway.upstream.relay import Finish, StreamRelayResponse, read_whole_reply

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
    body: bytes | FormBody  # the client's JSON bytes, or an edit's form streamed from its spool
    path: str = GENERATIONS_PATH  # the upstream route
    # What identifies the request under an Idempotency-Key; called only when one is given. None: the body's bytes.
    fingerprint: Callable[[], str] | None = None

    def release(self) -> None:
        """Free what the body holds (an edit's spooled files) once the upstream has it, or never will."""
        if isinstance(self.body, FormBody):
            self.body.close()


Prepare = Callable[[Principal], Awaitable[Prepared]]
Admit = Callable[[Gateway, Exchange], Awaitable[Headers]]
# What follows admission: by default the upstream call and relay; a job's submission enqueues instead.
Then = Callable[[Gateway, Exchange, Prepared, Headers], Awaitable[Any]]


async def handle(gw: Gateway, arrival: Arrival, prepare: Prepare, *, admit_with: Admit = admit,
                 then: Then | None = None) -> Any:
    """Run one request through the pipeline; returns the ASGI response for the client."""
    rid = arrival.request_id
    model_label = "-"
    principal = None
    prepared: Prepared | None = None
    ticket: Ticket | None = None
    exchange: Exchange | None = None
    try:
        principal = await gw.authenticate(arrival.request)
        key = idempotency_key(arrival.request.headers)
        prepared = await prepare(principal)
        image = prepared.image
        model_label = image.model
        if principal.models is not None and image.model not in principal.models:
            raise ModelNotAllowed(f"This key may not use the model '{image.model}'.", param="model")
        if key is not None and gw.idempotency is not None:
            ticket = await gw.idempotency.begin(principal.user, key, arrival.route,
                                                _fingerprint(prepared), rid)
            if ticket.replay is not None:
                prepared.release()
                return replay_response(ticket.replay, rid, gw.settings.server.send_timeout_seconds)
        exchange = Exchange(rid, principal, image, route=arrival.route, started=arrival.received,
                            started_ms=arrival.received_ms, ticket=ticket)
        if then is None:  # on its way upstream: through the intake (a job's submission is not)
            await enter_intake(gw, exchange)
        limit_headers = await admit_with(gw, exchange)
        if then is not None:  # a job's submission: its 202 is the answer repeats of the key get
            response = await then(gw, exchange, prepared, limit_headers)
            prepared.release()  # what the job needs of an edit's files is in the image store now
            if ticket is not None:
                await ticket.conclude(answer_of(response.status_code, response.media_type or "application/json",
                                                [bytes(response.body)]))
            return response
    except GatewayError as err:
        if exchange is not None:
            exchange.leave_intake()
        if prepared is not None:
            prepared.release()
        if ticket is not None:
            await ticket.release()  # refused before the upstream: the key can be used again
        gw.meter.refused(arrival.route, model_label, err, principal)
        return err.to_response(rid)
    except BaseException:
        if exchange is not None:
            exchange.leave_intake()
        raise
    return await call_upstream(gw, exchange, prepared, arrival.request, limit_headers)


def _fingerprint(prepared: Prepared) -> str:
    if prepared.fingerprint is not None:
        return prepared.fingerprint()
    assert isinstance(prepared.body, bytes), "a front door with a streamed body gives its own fingerprint"
    return body_fingerprint(prepared.body)


async def call_upstream(gw: Gateway, exchange: Exchange, prepared: Prepared, request: Request,
                        limit_headers: Headers) -> Any:
    """Send an admitted request upstream in a shielded task; the client gets its relay."""
    headers: Headers = [(b"x-request-id", exchange.request_id.encode()), *limit_headers]
    task = spawn(forward(gw, exchange, prepared, request, headers, limit_headers))
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
    ticket = exchange.ticket
    tap = ticket.tap if ticket is not None else None
    finish = gw.meter.finish if ticket is None or tap is None else _finish_keeping(gw, ticket, reply.response.status)
    return StreamRelayResponse(exchange, reply, headers, finish, s.upstream.timeout_seconds,
                               s.server.send_timeout_seconds, s.upstream.max_response_bytes,
                               renew=lambda ex: keep_lease(gw, ex), tap=tap)


def _drain_orphaned_stream(task: asyncio.Task[Any], gw: Gateway, exchange: Exchange) -> None:
    """A stream whose requester was cancelled as its reply arrived: read it to the end and settle it."""
    if not task.cancelled() and task.exception() is None and isinstance(task.result(), UpstreamReply):
        spawn(_stream_relay(gw, exchange, task.result(), []).drain_and_finish())


def _finish_keeping(gw: Gateway, ticket: Ticket, status: int) -> Finish:
    """Finish a stream, then keep its event bytes as its Idempotency-Key's answer."""
    async def finish(exchange: Exchange) -> None:
        await gw.meter.finish(exchange)
        await ticket.conclude(answer_of(status, "text/event-stream", ticket.tap or []))
    return finish


async def forward(gw: Gateway, exchange: Exchange, prepared: Prepared, request: Request, headers: Headers,
                  limit_headers: Headers) -> Any:
    """The upstream call of an admitted request; finished (settled) exactly once unless it is a stream.

    Returns the stream's ``UpstreamReply`` (the relay finishes it), or the client's response.
    """
    rid = exchange.request_id
    kept: Answer | None = None  # the answer an Idempotency-Key's repeats get; None: release the key
    try:
        idempotency_key = request.headers.get("idempotency-key")
        if idempotency_key is not None:
            idempotency_key = upstream_idempotency_key(exchange.principal.user, idempotency_key)
        async def send() -> UpstreamReply:
            # Out of the intake before the call: connecting (TLS to a remote upstream: round trips) and an
            # edit's upload are waits on the network, which a slot held meanwhile would turn into a queue.
            exchange.leave_intake()
            try:
                return await gw.upstream.send(prepared.body, request.headers, rid, idempotency_key=idempotency_key,
                                              path=prepared.path)
            finally:
                prepared.release()

        outcome = await _exchange(gw, exchange, send)
        if isinstance(outcome, UpstreamReply):
            return outcome
        content_type, chunks = outcome
        if 200 <= exchange.status < 300 and stored_as_urls(exchange.request):
            chunks = await _images_as_urls(gw, exchange, chunks)
        response: Any = ChunksResponse(exchange.status, chunks, [(b"content-type", content_type), *headers],
                                       gw.settings.server.send_timeout_seconds)
        if exchange.ticket is not None:
            kept = answer_of(exchange.status, content_type.decode(), chunks)
    except GatewayError as err:
        if not isinstance(err, StorageUnavailable):  # the upstream answered (and billed): its status stays
            _failed(exchange, err)
        else:
            exchange.error_reason = err.code
        err.headers.update((k.decode(), v.decode()) for k, v in limit_headers)  # x-ratelimit-*: admitted
        response = err.to_response(rid)
        if exchange.ticket is not None and may_have_billed(err):
            kept = answer_of_error(err)
    except Exception:
        exchange.status, exchange.error_reason = 500, "internal_error"
        await gw.meter.finish(exchange)
        if exchange.ticket is not None:
            await exchange.ticket.release()
        raise
    finally:
        exchange.leave_intake()  # normally gone already, before the upstream call
    await gw.meter.finish(exchange)
    if exchange.ticket is not None:
        await exchange.ticket.conclude(kept)
    return response


async def _images_as_urls(gw: Gateway, exchange: Exchange, chunks: list[bytes]) -> list[bytes]:
    """A GPT image answer whose base64 images are stored and replaced by presigned URLs (SPEC §9)."""
    if gw.image_store is None:
        raise StorageUnavailable("The gateway has no image store for 'response_format' 'url'.")
    body = orjson.loads(b"".join(chunks))
    return [orjson.dumps(await images_as_urls(gw.image_store, body))]


async def run_detached(gw: Gateway, exchange: Exchange, body: bytes | FormBody, idempotency_key: str,
                       path: str) -> tuple[int, bytes]:
    """An admitted request no client waits for (a job): POST ``body`` to ``path``, read the JSON answer, settle.

    Returns the status and body (the upstream's, or the gateway's own OpenAI-shaped error).
    """
    try:
        outcome = await _exchange(gw, exchange, lambda: gw.upstream.send(
            body, {}, exchange.request_id, idempotency_key=idempotency_key, path=path))
        if isinstance(outcome, UpstreamReply):  # jobs are submitted without stream: true
            outcome.response.release()
            raise UpstreamError(502, "The upstream answered a job with an event stream.")
        answer = b"".join(outcome[1])
    except GatewayError as err:
        _failed(exchange, err)
        answer = orjson.dumps(err.body())
    except Exception:
        exchange.status, exchange.error_reason = 500, "internal_error"
        await gw.meter.finish(exchange)
        raise
    await gw.meter.finish(exchange)
    return exchange.status, answer


async def _exchange(gw: Gateway, exchange: Exchange,
                    send: Callable[[], Awaitable[UpstreamReply]]) -> UpstreamReply | tuple[bytes, list[bytes]]:
    """Send upstream; a stream's reply as it arrived, else (content type, body chunks) read whole.

    The request's ``stream`` field decides which (read_whole_reply answers a mismatched 2xx with 502).
    """
    reply = await send()
    if exchange.request.stream and reply.is_event_stream:
        return reply
    upstream = gw.settings.upstream
    chunks = await read_whole_reply(exchange, reply, upstream.timeout_seconds, upstream.max_response_bytes)
    exchange.status = reply.response.status
    return reply.response.headers.get("content-type", "application/json").encode(), chunks


def _failed(exchange: Exchange, err: GatewayError) -> None:
    exchange.status = err.status
    exchange.error_reason = exchange.error_reason or err.code
