"""The floor of any client engine: a bare HTTP/1.1 client on asyncio and httptools (benchmark only).

What a relay costs when its client does nothing but the protocol: a keep-alive pool of plain
TCP connections, one write per request, llhttp (httptools, uvicorn's parser) for the answer.
No TLS, timeouts, flow control, redirects or error mapping, so no real engine can be cheaper;
the gap between it and aiohttp bounds what replacing aiohttp could gain (bench/RESULTS.md,
"Session 7"). Never used by the gateway.
"""

from __future__ import annotations

import asyncio
from collections import deque
from urllib.parse import urlsplit

import httptools


class _Connection(asyncio.Protocol):
    """One keep-alive connection: ``request`` writes a request and resolves with the whole answer."""

    def __init__(self, idle: deque[_Connection]) -> None:
        self._idle = idle
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[tuple[int, str, bytes]] | None = None
        self._content_type = "application/json"
        self._body: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport; idempotent: FloorClient.post calls it too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(ConnectionError("the upstream closed the connection"))

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            assert self._transport is not None and self._answer is not None
            self._transport.close()
            self._answer.set_exception(ConnectionError(str(exc)))

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self._content_type = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        assert self._answer is not None and self._transport is not None
        keep = self._parser.should_keep_alive()
        self._answer.set_result((self._parser.get_status_code(), self._content_type, b"".join(self._body)))
        if keep:
            self._idle.append(self)
        else:
            self.closed = True
            self._transport.close()

    def request(self, data: bytes) -> asyncio.Future[tuple[int, str, bytes]]:
        assert self._transport is not None
        self._answer = asyncio.get_running_loop().create_future()
        self._content_type, self._body = "application/json", []
        self._transport.write(data)
        return self._answer


class FloorClient:
    """POSTs to one plain-HTTP URL over a pool of keep-alive connections."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        lines = [f"POST {parts.path} HTTP/1.1", f"host: {parts.netloc}", *(f"{k}: {v}" for k, v in headers.items())]
        self._head = ("\r\n".join(lines) + "\r\ncontent-length: ").encode("latin-1")
        self._idle: deque[_Connection] = deque()

    async def post(self, body: bytes) -> tuple[int, str, bytes]:
        conn = None
        while self._idle and conn is None:
            candidate = self._idle.pop()
            conn = None if candidate.closed else candidate
        if conn is None:
            loop = asyncio.get_running_loop()
            transport, conn = await loop.create_connection(lambda: _Connection(self._idle), self._host, self._port)
            conn.connection_made(transport)  # uvloop may call it only after create_connection has returned
        return await conn.request(b"".join((self._head, str(len(body)).encode(), b"\r\n\r\n", body)))

    async def close(self) -> None:
        while self._idle:
            conn = self._idle.pop()
            if conn._transport is not None:
                conn._transport.close()
