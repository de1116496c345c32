"""uvicorn's httptools protocol with the SPEC's connection limits (section 3, "Connections").

- Request line and headers over ``max_header_bytes``: 431 and the connection is closed.
- Headers not complete ``header_timeout`` seconds after the connection opened, or after
  the first byte of a later request on a kept-alive connection: closed (408 if part of a
  request had arrived). Idle kept-alive connections stay governed by ``keep_alive_seconds``.
- A request the parser refuses: 400 in OpenAI's shape (uvicorn's own is plain text), connection closed.
- A request body that stops arriving for ``body_timeout`` seconds, or arrives slower than
  ``body_min_rate`` bytes a second (``body_timeout`` seconds of grace, one more second for every
  ``body_min_rate`` bytes, as Apache's mod_reqtimeout): 408 if no answer has started, connection
  closed; the app sees the client go. Time the server itself stops reading (uvicorn's flow
  control, while the app has not taken what came) does not count. Checked by a timer only while
  a body is incomplete after a read: a body that comes with its headers costs nothing.

Each response's head (status line and headers) is held until the body's first write, or the end of
the loop tick, and both go out in one ``writelines``: a small JSON answer is one write and one packet,
not two (``_JoinedHead``).

Bytes are counted as they arrive, before httptools sees them: the parser joins a header
value's pieces by concatenation until the value ends (quadratic in its size), so a count in
``on_header`` would come too late. This subclasses uvicorn internals (``HttpToolsProtocol``'s
``data_received``, ``on_message_begin``, ``on_headers_complete``, ``cycle``), hence the upper
bound on uvicorn in pyproject.toml; tests/http/test_server.py fails if they change.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.errors import BodyTimeout, GatewayError, HeadersTimeout, HeadersTooLarge, InvalidRequest

_BODY_TICK_SECONDS = 1.0  # how often an incomplete body is checked (at most; a quarter of body_timeout if less)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that bounds the size and the arrival time of request headers and bodies."""

    def __init__(self, *args: Any, max_header_bytes: int, header_timeout: float, body_timeout: float,
                 body_min_rate: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_header_bytes = max_header_bytes
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.body_min_rate = body_min_rate
        self._in_head = True  # what arrives is a request line and headers (not a body)
        self._begun = False  # a request's first byte has arrived, its headers have not ended
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_body = False  # a request's headers have ended, its body has not
        self._body_bytes = 0
        self._body_idle = 0.0  # seconds without a body byte, while the server was reading
        self._body_spent = 0.0  # seconds the body has taken so far, while the server was reading
        self._body_ticked = 0.0  # loop time of the last check
        self._body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._disarm_body()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._received(data)
        if self._in_body and self._body_timer is None and not self.transport.is_closing():
            self._body_ticked = self.loop.time()
            self._arm_body()

    def _received(self, data: bytes) -> None:
        if not self._in_head:
            super().data_received(data)
        else:
            room = self.max_header_bytes - self._head_bytes
            if len(data) <= room:
                self._head_bytes += len(data)
                super().data_received(data)
            else:
                # Feed only what the limit allows: if the headers end inside it, the rest is body or a
                # pipelined request, counted afresh.
                super().data_received(data[:room])
                if self.transport.is_closing():
                    return
                if self._in_head:
                    self._refuse(HeadersTooLarge(f"Request headers exceed {self.max_header_bytes} bytes."))
                    return
                self._received(data[room:])
                return
        if self._begun and self._head_timer is None:
            # A later request on a kept-alive connection stopped mid-head. Armed only now, not in
            # on_message_begin: a head that arrives whole (nearly all) then costs no timer.
            self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # what comes next on this connection is another request's head
        self._in_body = False
        self._disarm_body()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._body_bytes += len(body)
        self._body_idle = 0.0

    def on_headers_complete(self) -> None:
        self._in_head = self._begun = False
        self._head_bytes = 0
        self._in_body = True
        self._body_bytes = 0
        self._body_idle = self._body_spent = 0.0
        self._disarm()
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.transport is self.transport:
            self.cycle.transport = _JoinedHead(self.transport, self.loop)  # type: ignore[assignment]

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request started while an answer is still on its way: that answer comes first.
            self._arm()
            return
        if self._head_bytes:
            self._refuse(HeadersTimeout(f"Request headers not complete within {self.header_timeout:g} s."))
        else:
            self.transport.close()

    def _arm_body(self) -> None:
        self._body_timer = self.loop.call_later(min(_BODY_TICK_SECONDS, self.body_timeout / 4), self._body_tick)

    def _disarm_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_tick(self) -> None:
        """Check an incomplete body: cut it if it stopped, or arrives too slowly; else look again later."""
        self._body_timer = None
        if not self._in_body or self.transport.is_closing():
            return
        now = self.loop.time()
        elapsed, self._body_ticked = now - self._body_ticked, now
        if not self.flow.read_paused:  # paused: the app has not taken what came, not the client's delay
            self._body_idle += elapsed
            self._body_spent += elapsed
        if self._body_idle >= self.body_timeout:
            self._body_timed_out(f"No request body bytes arrived for {self.body_timeout:g} s.")
        elif self._body_spent > self.body_timeout + self._body_bytes / self.body_min_rate:
            self._body_timed_out(f"The request body arrived slower than {self.body_min_rate:g} bytes a second.")
        else:
            self._arm_body()

    def _body_timed_out(self, message: str) -> None:
        if self.cycle is not None and not self.cycle.response_started:
            self._refuse(BodyTimeout(message))
        else:  # the app answered already (say 413 before reading it all): only the connection goes
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A request httptools could not parse (a control character in a header, a broken request line):
        uvicorn's plain-text 400, in OpenAI's error shape like every other error (SPEC §3)."""
        self._refuse(InvalidRequest(msg))

    def _refuse(self, err: GatewayError) -> None:
        """Answer ``err`` in OpenAI's shape and close (the request was never parsed whole)."""
        body = orjson.dumps(err.body())
        head = [STATUS_LINE[err.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                 b"\r\nconnection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


class _JoinedHead:
    """A response cycle's view of the connection's transport: its first write (the head) waits for the next.

    uvicorn writes a response's head at ``http.response.start`` and its body at each
    ``http.response.body``: two syscalls and two packets for a small answer, and the client woken
    twice. Held here, the head goes out with the first body write in one ``writelines`` (no copy),
    or on its own at the end of the loop tick (a stream whose first event is not there yet), before
    a close, and before anything the loop runs next. Everything else is the transport's own.
    """

    __slots__ = ("_first", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._first = True

    def write(self, data: bytes) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.writelines((held, data))
        elif self._first:
            self._first = False
            self._held = data
            self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
