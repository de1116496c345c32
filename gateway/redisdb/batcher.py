"""Script calls issued in the same event-loop tick go to Redis as one pipeline.

Contract of ``Batcher.run(script, keys, args, deadline=None)``:

- returns the script's reply, or raises its error (``ResponseError``);
- calls are sent in arrival order, as pipelines (no MULTI: each script is atomic by itself,
  the pipeline only saves round trips) of at most ``max_batch`` calls, over at most
  ``connections`` pipelines in flight at once; the rest wait in the queue, however long
  Redis takes, as long as it answers (no per-call timeout);
- a call with a ``deadline`` (an admission) is *shed*, never sent, if the queue already
  holds ``max_queue`` calls or the deadline (``time.monotonic()``) passes before a
  connection is free: ``Shed`` is raised and the caller answers 503 with ``retry-after``;
  calls without one (settlements) are never shed;
- when the circuit (``Health``) is open, calls fail at once with ``CircuitOpen`` (never
  sent); when it opens, queued calls fail with it, and calls in flight with
  ``RedisUnavailable`` (their scripts may have run: admissions are undone with cancel.lua,
  settlements are idempotent);
- a connection error fails the calls of its pipeline with that error and wakes the pinger;
- a script missing from Redis (restart, SCRIPT FLUSH) is loaded, and the calls that got
  NOSCRIPT are sent once more;
- Redis Cluster: the cluster client's pipeline splits the batch by node, and every call's
  keys share one hash tag (``RedisKeys``), so each call goes whole to one node.

A standalone client's pipelines skip redis-py's ``Pipeline``: the batcher keeps up to
``connections`` connections taken from the client's pool, writes a batch's packed commands
in one send and reads the replies in order (an error reply is that call's error). That costs
a single call 19 us of CPU instead of 85 us (redis-py 8's pipeline, and the pool's get and
release with their checks, around the same bytes); see bench/RESULTS.md. As redis-py's
pipeline did (``Retry(NoBackoff(), 1)``), a batch whose connection fails is sent once more on
a fresh connection (every script is idempotent on its request id); a connection that failed or
was interrupted mid-reply is closed, never reused.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.redisdb.client import REDIS_ERRORS
from gateway.redisdb.health import CircuitOpen, Health, RedisUnavailable


class Shed(Exception):
    """An admission refused before reaching Redis: the queue is full or it waited past its deadline."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "queue_full" or "deadline"


@dataclass(slots=True)
class _Call:
    script: Any  # a registered script: ``.sha`` and ``.script`` (its source)
    keys: Sequence[Any]
    args: Sequence[Any]
    future: asyncio.Future[Any]
    deadline: float | None


class Batcher:
    """Pipelines the script calls of one loop tick over a few connections; see the module contract."""

    def __init__(self, client: Any, *, connections: int = 4, max_batch: int = 512, max_queue: int = 10_000,
                 health: Health | None = None) -> None:
        self.client = client
        self.connections = connections
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.health = health
        self._queue: deque[_Call] = deque()
        self._busy = 0
        self._scheduled = False
        self._sweep: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        # Standalone: connections held for the pipelines (see the module docstring); Cluster: redis-py's pipeline.
        self._direct = not isinstance(client, RedisCluster) and hasattr(client, "connection_pool")
        self._idle: list[Any] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the first call: a batcher serves one
        if health is not None:
            health.on_open(self._fail_all)

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def run(self, script: Any, keys: Sequence[Any], args: Sequence[Any], *,
                  deadline: float | None = None) -> Any:
        """Run ``script`` with ``keys`` and ``args`` in the next pipeline; see the module contract."""
        if self.health is not None and self.health.open:
            raise CircuitOpen(f"redis unavailable ({self.health.reason})")
        if deadline is not None and len(self._queue) >= self.max_queue:
            raise Shed("queue_full")
        loop = self._event_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Call(script, keys, args, future, deadline))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The loop of the first call, looked up once: get_running_loop is a getpid system call on Python 3.11."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _flush(self) -> None:
        self._scheduled = False
        now = time.monotonic()
        while self._queue and self._busy < self.connections:
            batch: list[_Call] = []
            while self._queue and len(batch) < self.max_batch:
                call = self._queue.popleft()
                if call.future.done():  # its caller was cancelled while it waited
                    continue
                if call.deadline is not None and now > call.deadline:
                    call.future.set_exception(Shed("deadline"))
                    continue
                batch.append(call)
            if batch:
                self._busy += 1
                task = self._event_loop().create_task(self._send(batch))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
        if self._queue and self._sweep is None:
            self._sweep = self._event_loop().call_later(0.05, self._shed_expired)

    def _shed_expired(self) -> None:
        """Shed queued admissions past their deadline while every connection is busy."""
        self._sweep = None
        now = time.monotonic()
        kept: deque[_Call] = deque()
        for call in self._queue:
            if call.future.done():
                continue
            if call.deadline is not None and now > call.deadline:
                call.future.set_exception(Shed("deadline"))
            else:
                kept.append(call)
        self._queue = kept
        if self._queue:
            self._sweep = self._event_loop().call_later(0.05, self._shed_expired)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            if not self._direct:
                replies = await _loading_scripts(batch, self._pipeline, self.client.script_load)
            else:
                try:
                    replies = await self._on_connection(batch)
                except (RedisConnectionError, RedisTimeoutError):
                    # A restart or a network cut breaks the held connections too: drop them, and
                    # send once more on one the pool has just checked (or opened).
                    await self._drop_idle()
                    replies = await self._on_connection(batch)
        except asyncio.CancelledError:
            _fail(batch, RedisUnavailable("redis unavailable: circuit opened while waiting for a reply"))
            raise
        except REDIS_ERRORS as exc:
            _fail(batch, exc)
            if self.health is not None:
                self.health.suspect()
        else:
            if self.health is not None:
                self.health.replied()
            for call, reply in zip(batch, replies, strict=True):
                if call.future.done():
                    continue
                if isinstance(reply, BaseException):
                    call.future.set_exception(reply)
                else:
                    call.future.set_result(reply)
        finally:
            self._busy -= 1
            if self._queue and not self._scheduled:
                self._scheduled = True
                self._event_loop().call_soon(self._flush)

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for call in batch:
            pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
        return list(await pipe.execute(raise_on_error=False))

    async def _on_connection(self, batch: list[_Call]) -> list[Any]:
        """The batch's replies over a held connection; the connection is closed if anything fails."""
        pool = self.client.connection_pool
        conn = self._idle.pop() if self._idle else await pool.get_connection()
        try:
            replies = await _loading_scripts(batch, lambda calls: _round_trip(conn, calls),
                                             lambda source: _load_script(conn, source))
        except BaseException:
            await conn.disconnect()  # a reply may be half read: never reuse it
            await pool.release(conn)
            raise
        self._idle.append(conn)
        return replies

    async def _drop_idle(self) -> None:
        pool = self.client.connection_pool
        while self._idle:
            conn = self._idle.pop()
            await conn.disconnect()
            await pool.release(conn)

    def _fail_all(self) -> None:
        """The circuit opened: fail what waits and what is in flight (a stopped Redis never answers)."""
        _fail(list(self._queue), CircuitOpen("redis unavailable: circuit open"))
        self._queue.clear()
        for task in list(self._sending):
            task.cancel()

    async def close(self) -> None:
        """Wait for the pipelines in flight (settlements at shutdown), then give the held connections back."""
        if self._sending:
            await asyncio.wait(list(self._sending))
        while self._idle:
            await self.client.connection_pool.release(self._idle.pop())


def _fail(calls: Sequence[_Call], error: BaseException) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(error)


async def _loading_scripts(batch: list[_Call], run: Callable[[list[_Call]], Awaitable[list[Any]]],
                           load: Callable[[str], Awaitable[Any]]) -> list[Any]:
    """``run(batch)``'s replies; scripts Redis lacks (NOSCRIPT) are loaded and their calls run once more."""
    replies = await run(batch)
    missing = [c for c, r in zip(batch, replies, strict=True) if isinstance(r, NoScriptError)]
    if missing:
        for script in {id(c.script): c.script for c in missing}.values():
            await load(script.script)
        again = dict(zip(map(id, missing), await run(missing), strict=True))
        replies = [again.get(id(c), r) for c, r in zip(batch, replies, strict=True)]
    return replies


async def _round_trip(conn: Any, batch: list[_Call]) -> list[Any]:
    """Send the batch's EVALSHAs in one write and read their replies in order (an error reply is its call's)."""
    packed: list[bytes] = []
    for call in batch:
        packed += conn.pack_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
    await conn.send_packed_command(packed, check_health=False)
    replies: list[Any] = []
    for _ in batch:
        try:
            replies.append(await conn.read_response())
        except ResponseError as exc:  # the connection is still in step: the next reply is the next call's
            replies.append(exc)
    return replies


async def _load_script(conn: Any, source: str) -> None:
    await conn.send_command("SCRIPT", "LOAD", source)
    await conn.read_response()
