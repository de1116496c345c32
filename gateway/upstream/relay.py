"""Relaying the upstream's answer to the client.

Both paths read the upstream to its end whatever the client does, so the usage the
upstream reported (and billed) is always known, then call ``finish`` (metrics,
settlement) before the client's response is closed.
- JSON: read into a list of chunks (no joins, no re-serialisation) while a scanner
  picks up ``usage``; a failure mid-body becomes a clean 502/504.
- SSE: every chunk is forwarded as it arrives, byte for byte, while a side parser sums
  the usage; a failure mid-stream ends the stream with ``event: error``. Reading runs
  apart from sending, so the stream is settled when the upstream ends, not when a slow
  client has read it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError, UpstreamError, sse_error_event
from gateway.pipeline.exchange import Exchange
from gateway.tasks import spawn
from gateway.upstream.client import READ_ERRORS, UpstreamReply, salvage, translate_read_error
from gateway.upstream.delivery import ClientLink
from gateway.upstream.observe import JsonUsage, SseUsageParser, usage_from_json

Finish = Callable[[Exchange], Awaitable[None]]
Renew = Callable[[Exchange], Awaitable[None]]  # keeps a running request's lease until cancelled


def _upstream_done(exchange: Exchange, reply: UpstreamReply) -> None:
    exchange.upstream_seconds = time.monotonic() - reply.started


class Observer(Protocol):
    def feed(self, chunk: bytes) -> None: ...


async def read_upstream(exchange: Exchange, reply: UpstreamReply, timeout_seconds: float, observer: Observer,
                        sink: Callable[[bytes], None] | None = None) -> GatewayError | None:
    """Read the upstream body to its end through ``observer`` (and ``sink``); returns the read error, if any."""
    try:
        # Chunk by chunk as they arrived: iter_any() would join what is buffered, copying megabytes.
        async for chunk, _ in reply.response.content.iter_chunks():
            observer.feed(chunk)
            if sink is not None:
                sink(chunk)
    except READ_ERRORS as exc:
        for chunk in salvage(reply.response.content):
            observer.feed(chunk)
            if sink is not None:
                sink(chunk)
        err = translate_read_error(exc, timeout_seconds)
        exchange.error_reason = err.code
        return err
    finally:
        reply.response.release()
        _upstream_done(exchange, reply)
    return None


async def read_whole_reply(exchange: Exchange, reply: UpstreamReply, timeout_seconds: float,
                           max_bytes: int | None = None) -> list[bytes]:
    """The body of an answer relayed whole; a 2xx of the other type than the request asked for is 502."""
    if 200 <= reply.response.status < 300 and reply.is_event_stream != exchange.request.stream:
        raise await _read_wrong_type(exchange, reply, timeout_seconds)
    return await read_json_reply(exchange, reply, timeout_seconds, max_bytes)


def billed_502(message: str) -> UpstreamError:
    """A 502 for a 2xx answer the client cannot get: the upstream generated (and billed) it, so no retry."""
    err = UpstreamError(502, message)
    err.headers["x-should-retry"] = "false"
    return err


async def _read_wrong_type(exchange: Exchange, reply: UpstreamReply, timeout_seconds: float) -> GatewayError:
    """Read a 2xx answer of the wrong type to its end for its usage (the upstream billed it): the error to answer."""
    sse = SseUsageParser() if reply.is_event_stream else None
    scanner = JsonUsage(("usage",))
    err = await read_upstream(exchange, reply, timeout_seconds, sse or scanner)
    if err is not None:
        return err
    if sse is not None:
        sse.close()
    exchange.usage = sse.usage if sse is not None else usage_from_json(scanner)
    exchange.upstream_billed = True
    asked = "an event stream (stream: true)" if exchange.request.stream else "JSON (stream: false)"
    return billed_502(f"The upstream answered {reply.response.content_type} where {asked} was asked for.")


class _BoundedChunks:
    """The chunks of a body, kept while they fit in ``max_bytes``; past it only their size is counted."""

    def __init__(self, max_bytes: int | None) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.max_bytes = max_bytes

    def append(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            self.chunks = []  # freed now: the body is read on only for its usage
        else:
            self.chunks.append(chunk)


async def read_json_reply(exchange: Exchange, reply: UpstreamReply, timeout_seconds: float,
                          max_bytes: int | None = None) -> list[bytes]:
    """The whole upstream body as chunks, with its usage recorded on ``exchange``.

    A body over ``max_bytes`` is read to its end for its usage (billed if it was a 2xx) and is a 502.
    """
    scanner = JsonUsage(("usage", "error"))
    body = _BoundedChunks(max_bytes)
    err = await read_upstream(exchange, reply, timeout_seconds, scanner, body.append)
    if err is not None:
        raise err
    status = reply.response.status
    if 200 <= status < 300:
        exchange.usage = usage_from_json(scanner)
    if max_bytes is not None and body.size > max_bytes:
        exchange.upstream_billed = 200 <= status < 300
        exchange.error_reason = "response_too_large"
        raise billed_502(f"The upstream's answer ({body.size} bytes) exceeds the gateway's limit of {max_bytes} "
                         "bytes (upstream.max_response_bytes).")
    if not 200 <= status < 300 and not isinstance(scanner.value("error"), dict):
        # Not an OpenAI error body (a proxy's HTML page, another format): the SDKs need OpenAI's shape.
        raise UpstreamError(status, f"The upstream answered {status} without an OpenAI error body.")
    return body.chunks


class StreamRelayResponse:
    """Forwards an upstream SSE stream event for event, byte for byte; reading never waits for the client.

    A background reader reads the upstream to its end into a backlog and finishes (settles) the
    exchange the moment the upstream ends; the response sends the backlog at the client's pace.
    A client that takes nothing for the send timeout, or falls ``max_backlog_bytes`` behind, is
    dropped; the reader goes on to the end. ``renew`` keeps the request's lease while it runs.
    """

    def __init__(self, exchange: Exchange, reply: UpstreamReply, headers: list[tuple[bytes, bytes]],
                 finish: Finish, timeout_seconds: float, send_timeout_seconds: float = 60.0,
                 max_backlog_bytes: int = 256 * 1024 * 1024, renew: Renew | None = None,
                 tap: list[bytes] | None = None) -> None:
        self.exchange = exchange
        self.reply = reply
        self.headers = headers
        self.finish = finish
        self.timeout_seconds = timeout_seconds
        self.send_timeout_seconds = send_timeout_seconds
        self.max_backlog_bytes = max_backlog_bytes
        self.renew = renew
        self.tap = tap  # every byte the upstream sent, for an Idempotency-Key's replay
        self.parser = SseUsageParser()
        self._link: ClientLink | None = None  # None: nobody to send to (not started, gone, cancelled)
        self._backlog: deque[bytes] = deque()
        self._backlog_bytes = 0
        self._wake = asyncio.Event()
        self._tail: bytes | None = None  # set once the exchange is finished: the last bytes to send

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.exchange.status = self.reply.response.status
        link = self._link = ClientLink(send, receive, self.send_timeout_seconds, self.exchange)
        spawn(self._read_and_finish())  # a background task: shutdown waits for it, whatever the client does
        try:
            if await link.send({"type": "http.response.start", "status": self.reply.response.status,
                                "headers": self.headers}):
                await self._deliver(link)
        finally:
            self._link = None
            self._backlog.clear()
            await link.close()

    async def _deliver(self, link: ClientLink) -> None:
        """Send the backlog as it grows, then the tail; returns early if the client goes."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._backlog:
                chunk = self._backlog.popleft()
                self._backlog_bytes -= len(chunk)
                if not await link.send({"type": "http.response.body", "body": chunk, "more_body": True}):
                    return
            if link.gone:
                return
            if self._tail is not None:
                await link.send({"type": "http.response.body", "body": self._tail, "more_body": False})
                return

    def _seen(self, chunk: bytes) -> None:
        if self.tap is not None:
            self.tap.append(chunk)
        self._queue(chunk)

    def _queue(self, chunk: bytes) -> None:
        link = self._link
        if link is None or link.gone:
            return
        self._backlog.append(chunk)
        self._backlog_bytes += len(chunk)
        if self._backlog_bytes > self.max_backlog_bytes:
            link.drop()  # too far behind: holding more would let one slow client use unbounded memory
            self._backlog.clear()
            self._backlog_bytes = 0
        self._wake.set()

    async def _read_and_finish(self) -> None:
        """Read the upstream to its end, then finish (settle) the exchange: never waits for the client."""
        keeper = asyncio.ensure_future(self.renew(self.exchange)) if self.renew is not None else None
        tail = b""
        try:
            err = await read_upstream(self.exchange, self.reply, self.timeout_seconds, self.parser, self._seen)
            if err is not None:
                # The error is an event of its own: end a partial event first (clients drop it unparsed).
                tail = sse_error_event(err) if self.parser.at_boundary else b"\n\n" + sse_error_event(err)
                if self.tap is not None:
                    self.tap.append(tail)
            self.parser.close(clean=err is None)
            self.exchange.usage = self.parser.usage
            self.exchange.incomplete = self.parser.completed == 0 or self.exchange.error_reason is not None
            await self.finish(self.exchange)
        finally:
            if keeper is not None:
                keeper.cancel()
            self._tail = tail
            self._wake.set()

    async def drain_and_finish(self) -> None:
        """Read the stream to its end with nobody to send it to, then finish (settle) the exchange."""
        self.exchange.client_gone = True
        await self._read_and_finish()
