"""Sending an answer to the client with a deadline: a client that stops reading is dropped.

Every write waits at most ``server.send_timeout_seconds`` for the client to take it; past
that, the connection is aborted (what it never read is discarded, not kept in the socket's
buffer) and the response's memory is freed. uvicorn gives the ASGI app no handle on its
transport, so ``ClientLink`` finds it under uvicorn's ``receive`` (a bound method of the
connection's cycle); under another server the client is only marked gone and the server closes it.

The deadline is one timer per response, not one per send: a watchdog that wakes every
``timeout_seconds`` while the response lasts and drops the client if a send has been waiting that
long. (``asyncio.timeout`` around each send cost two timers, a Timeout object and three
``get_running_loop`` calls, each a ``getpid`` system call on Python 3.11, per send: ~12% of the
worker's CPU on small answers; ``wait_for`` would wrap every send in a task of its own.) Under
uvicorn the drop aborts the transport, which ends the waiting send; under another server the
watchdog cancels the sending task instead, and the send returns False. A finished answer
(``ChunksResponse``) has no disconnect watcher either: uvicorn ignores sends to a departed client,
and only a dropped connection needs to wait for the server to see it go.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from gateway.malloc import give_memory_back

_DISCONNECT_WAIT_SECONDS = 5.0  # for the server to notice an aborted connection before the app returns
# uvloop's clock and timers count whole milliseconds (a delay is rounded to one): a wake this close to a send's
# deadline is the deadline. Otherwise a wake a hair early re-armed the watchdog for "now", again and again
# until the clock ticked: hundreds of wakes for one stalled send.
_CLOCK_SLACK_SECONDS = 0.001


class ClientLink:
    """The client's side of one response: sends with a deadline, learns when the client has gone."""

    def __init__(self, send: Send, receive: Receive, timeout_seconds: float, exchange: Any = None, *,
                 watch: bool = True) -> None:
        self._send = send
        self._receive = receive
        self.timeout_seconds = timeout_seconds
        self.exchange = exchange  # its ``client_gone`` is set when the client leaves or is dropped
        self.gone = False
        self.dropped = False
        # The task that sends (the response's own), its loop, and the watchdog of its sends' deadline.
        self._task = asyncio.current_task()
        self._loop = self._task.get_loop() if self._task is not None else asyncio.get_running_loop()
        self._waiting_since: float | None = None  # loop time a send started, while it waits
        self._cancelled_send = False  # the watchdog cancelled the task to end a send (no transport)
        self._watchdog: asyncio.TimerHandle | None = self._loop.call_later(timeout_seconds, self._check)
        # uvicorn drops sends to a departed client silently: learn of it from receive() instead.
        # watch=False (a finished answer): nothing to learn early; sends to a departed client are no-ops.
        self._watcher = asyncio.ensure_future(self._watch_disconnect()) if watch else None

    async def _watch_disconnect(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._mark_gone()

    def _mark_gone(self) -> None:
        self.gone = True
        if self.exchange is not None:
            self.exchange.client_gone = True

    async def send(self, message: Message) -> bool:
        """Send one message; False if the client is gone or was dropped for not taking it in time."""
        if self.gone:
            return False
        self._waiting_since = self._loop.time()
        try:
            await self._send(message)
        except OSError:  # ASGI 2.4 servers raise once the client has gone
            self._mark_gone()
            return False
        except asyncio.CancelledError:
            if not self._take_back_cancel():
                raise  # a cancellation of the request's own, not (only) the watchdog's
            return False
        finally:
            self._waiting_since = None
            if self._cancelled_send:  # the server's send turned the watchdog's cancellation into something else
                self._take_back_cancel()
        return not self.dropped  # an abort ended the send (uvicorn returns from it silently)

    def _check(self) -> None:
        """The watchdog: drop the client if a send has waited ``timeout_seconds``; else look again later."""
        self._watchdog = None
        since, now = self._waiting_since, self._loop.time()
        if since is not None and now - since >= self.timeout_seconds - _CLOCK_SLACK_SECONDS:
            if not self.drop() and self._task is not None:
                self._cancelled_send = True  # no transport to abort: end the send by cancelling it
                self._task.cancel()
            return
        wake = since + self.timeout_seconds if since is not None else now + self.timeout_seconds
        self._watchdog = self._loop.call_at(wake, self._check)

    def _take_back_cancel(self) -> bool:
        """Take back the watchdog's cancellation of the task, if one is held; True if no other one is left."""
        if not self._cancelled_send or self._task is None:
            return False
        self._cancelled_send = False
        return self._task.uncancel() == 0

    def drop(self) -> bool:
        """Abort the connection now: the client stopped reading (or fell too far behind).

        False if the server gave no transport to abort (the client is only marked gone).
        """
        self._mark_gone()
        self.dropped = True
        transport = getattr(getattr(self._receive, "__self__", None), "transport", None)
        if transport is None:
            return False
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: the kernel resets the connection and frees its send buffer, instead of holding
            # the unread bytes (and the connection) for as long as the client keeps its window shut.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        return True

    async def close(self) -> None:
        """Stop watching; after a drop, wait until the server has seen the connection go."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.gone and self._watcher is None and self.dropped:
            self._watcher = asyncio.ensure_future(self._watch_disconnect())
        if self._watcher is None:
            return
        if self.gone and not self._watcher.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._watcher), _DISCONNECT_WAIT_SECONDS)
        self._watcher.cancel()
        if self.dropped:
            give_memory_back()


class ChunksResponse:
    """A finished body sent as the chunks it arrived in, with the upstream's status and type."""

    def __init__(self, status: int, chunks: list[bytes], headers: list[tuple[bytes, bytes]],
                 send_timeout_seconds: float) -> None:
        self.status = status
        self.chunks = chunks
        self.headers = [*headers, (b"content-length", str(sum(map(len, chunks))).encode())]
        self.send_timeout_seconds = send_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        link = ClientLink(send, receive, self.send_timeout_seconds, watch=False)
        try:
            if not await link.send({"type": "http.response.start", "status": self.status, "headers": self.headers}):
                return
            last = len(self.chunks) - 1
            for i, chunk in enumerate(self.chunks):
                if not await link.send({"type": "http.response.body", "body": chunk, "more_body": i < last}):
                    return
            if last < 0:
                await link.send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.chunks = []  # a dropped client's answer is freed now, not when the connection object goes
            await link.close()
