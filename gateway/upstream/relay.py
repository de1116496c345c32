"""Relaying the upstream's answer to the client.

Both paths read the upstream to its end whatever the client does, so the usage the
upstream reported (and billed) is always known, then call ``finish`` (metrics,
settlement) before the client's response is closed.
- JSON: read into a list of chunks (no joins, no re-serialisation) while a scanner
  picks up ``usage``; a failure mid-body becomes a clean 502/504.
- SSE: every chunk is forwarded as it arrives, byte for byte, while a side parser sums
  the usage; a failure mid-stream ends the stream with ``event: error``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError, UpstreamError, sse_error_event
from gateway.pipeline.exchange import Exchange
from gateway.tasks import spawn
from gateway.upstream.client import READ_ERRORS, UpstreamReply, salvage, translate_read_error
from gateway.upstream.observe import JsonUsageScanner, SseUsageParser, usage_from_json

Finish = Callable[[Exchange], Awaitable[None]]


def _upstream_done(exchange: Exchange, reply: UpstreamReply) -> None:
    exchange.upstream_seconds = time.monotonic() - reply.started


class Observer(Protocol):
    def feed(self, chunk: bytes) -> None: ...


async def read_upstream(exchange: Exchange, reply: UpstreamReply, timeout_seconds: float, observer: Observer,
                        sink: Callable[[bytes], None] | None = None) -> GatewayError | None:
    """Read the upstream body to its end through ``observer`` (and ``sink``); returns the read error, if any."""
    try:
        async for chunk in reply.response.content.iter_any():
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


async def read_whole_reply(exchange: Exchange, reply: UpstreamReply, timeout_seconds: float) -> list[bytes]:
    """The body of an answer relayed whole; a 2xx of the other type than the request asked for is 502."""
    if 200 <= reply.response.status < 300 and reply.is_event_stream != exchange.request.stream:
        raise await _read_wrong_type(exchange, reply, timeout_seconds)
    return await read_json_reply(exchange, reply, timeout_seconds)


async def _read_wrong_type(exchange: Exchange, reply: UpstreamReply, timeout_seconds: float) -> GatewayError:
    """Read a 2xx answer of the wrong type to its end for its usage (the upstream billed it): the error to answer."""
    sse = SseUsageParser() if reply.is_event_stream else None
    scanner = JsonUsageScanner(("usage",))
    err = await read_upstream(exchange, reply, timeout_seconds, sse or scanner)
    if err is not None:
        return err
    if sse is not None:
        sse.close()
    exchange.usage = sse.usage if sse is not None else usage_from_json(scanner)
    exchange.upstream_billed = True
    asked = "an event stream (stream: true)" if exchange.request.stream else "JSON (stream: false)"
    wrong = UpstreamError(502, f"The upstream answered {reply.response.content_type} where {asked} was asked for.")
    wrong.headers["x-should-retry"] = "false"  # it generated (and billed) the images: a retry pays twice
    return wrong


async def read_json_reply(exchange: Exchange, reply: UpstreamReply, timeout_seconds: float) -> list[bytes]:
    """The whole upstream body as chunks, with its usage recorded on ``exchange``."""
    scanner = JsonUsageScanner(("usage", "error"))
    chunks: list[bytes] = []
    err = await read_upstream(exchange, reply, timeout_seconds, scanner, chunks.append)
    if err is not None:
        raise err
    status = reply.response.status
    if 200 <= status < 300:
        exchange.usage = usage_from_json(scanner)
    elif not isinstance(scanner.value("error"), dict):
        # Not an OpenAI error body (a proxy's HTML page, another format): the SDKs need OpenAI's shape.
        raise UpstreamError(status, f"The upstream answered {status} without an OpenAI error body.")
    return chunks


class ChunksResponse:
    """A finished body sent as the chunks it arrived in, with the upstream's status and type."""

    def __init__(self, status: int, chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.chunks = chunks
        self.headers = [*headers, (b"content-length", str(sum(map(len, chunks))).encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        last = len(self.chunks) - 1
        for i, chunk in enumerate(self.chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < last})
        if last < 0:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class StreamRelayResponse:
    """Forwards an upstream SSE stream event for event, byte for byte."""

    def __init__(self, exchange: Exchange, reply: UpstreamReply, headers: list[tuple[bytes, bytes]],
                 finish: Finish, timeout_seconds: float) -> None:
        self.exchange = exchange
        self.reply = reply
        self.headers = headers
        self.finish = finish
        self.timeout_seconds = timeout_seconds
        self.parser = SseUsageParser()
        self._upstream_closed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.exchange.status = self.reply.response.status
        # uvicorn drops sends to a departed client silently: learn of it from receive() instead.
        watcher = asyncio.create_task(self._watch_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": self.reply.response.status,
                        "headers": self.headers})
            tail = await self._pump(send)
        except asyncio.CancelledError:
            # The server is cancelling us (shutdown): finish reading and settling in the background.
            spawn(self.drain_and_finish())
            raise
        finally:
            watcher.cancel()
        await asyncio.shield(self.finish(self.exchange))
        await self._send(send, tail, more=False)

    async def _watch_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.exchange.client_gone = True

    async def _pump(self, send: Send) -> bytes:
        """Forward until the upstream ends; returns what must still be sent (an error event).

        Not closed on cancellation: the background drain goes on reading the same response.
        """
        try:
            async for chunk in self.reply.response.content.iter_any():
                self.parser.feed(chunk)
                await self._send(send, chunk, more=True)
        except READ_ERRORS as exc:
            for chunk in salvage(self.reply.response.content):
                self.parser.feed(chunk)
                await self._send(send, chunk, more=True)
            err: GatewayError = translate_read_error(exc, self.timeout_seconds)
            self.exchange.error_reason = err.code
            # The error is an event of its own: end a partial event first (clients drop it unparsed).
            tail = sse_error_event(err) if self.parser.at_boundary else b"\n\n" + sse_error_event(err)
            self._close_upstream()
            return tail
        self._close_upstream()
        return b""

    async def _send(self, send: Send, chunk: bytes, *, more: bool) -> None:
        if self.exchange.client_gone:
            return
        try:
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
        except OSError:  # ASGI 2.4 servers raise once the client has gone; keep reading upstream
            self.exchange.client_gone = True

    def _close_upstream(self) -> None:
        if self._upstream_closed:
            return
        self._upstream_closed = True
        self.parser.close(clean=self.exchange.error_reason is None)
        self.reply.response.release()
        _upstream_done(self.exchange, self.reply)
        self.exchange.usage = self.parser.usage
        self.exchange.incomplete = self.parser.completed == 0 or self.exchange.error_reason is not None

    async def drain_and_finish(self) -> None:
        """Read the rest of the stream with nobody to send it to, then finish (settle) the exchange."""
        self.exchange.client_gone = True
        try:
            async for chunk in self.reply.response.content.iter_any():
                self.parser.feed(chunk)
        except READ_ERRORS as exc:
            for chunk in salvage(self.reply.response.content):
                self.parser.feed(chunk)
            self.exchange.error_reason = translate_read_error(exc, self.timeout_seconds).code
        finally:
            self._close_upstream()
        await self.finish(self.exchange)
