"""Is Redis there? A circuit breaker fed by real signals, never by one slow call on a busy loop.

The circuit opens when ``failures`` health pings in a row failed (connection error, or no
answer within ``timeout`` seconds) *and* no reply of any kind (pipeline) came from Redis
while the last one waited: a worker whose event loop is saturated by a burst sees slow
pings, but its pipelines keep answering, so it never mistakes local queueing for an outage.
A connection error on a pipeline wakes the pinger at once. While open, callers fail at once
(``RedisUnavailable``); the pinger keeps going and the first answered ping closes it.

Worst case from Redis stopping to the circuit opening: about
``interval + failures * timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.redisdb.client import REDIS_ERRORS

log = logging.getLogger("gateway.redis")
_PING_ERRORS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, TimeoutError)


class RedisUnavailable(RedisConnectionError):
    """Redis is considered down (the circuit is open) and the call's answer is lost: it may have run."""


class CircuitOpen(RedisUnavailable):
    """Redis is considered down and the call was never sent."""


class Health:
    """The circuit breaker: ``open`` while Redis does not answer; ``start`` runs the pinger."""

    def __init__(self, ping: Callable[[], Any], *, interval: float, timeout: float, failures: int) -> None:
        self._ping = ping
        self.interval = interval
        self.timeout = timeout
        self.failures = failures
        self.open = False
        self.reason = ""
        self._failed = 0
        self._last_reply = time.monotonic()
        self._on_open: list[Callable[[], None]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def on_open(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the circuit opens (e.g. to fail calls waiting on Redis)."""
        self._on_open.append(callback)

    def replied(self) -> None:
        """Redis answered something: it is alive, whatever the pings' timing says."""
        self._last_reply = time.monotonic()

    def suspect(self) -> None:
        """A connection error on a call: check now rather than at the next interval."""
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        # A flag as well as the cancel: Python 3.11's wait_for can swallow a cancellation that lands as
        # its inner wait completes (the wake event set by a failing call), and the loop would go on.
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            self._wake.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def check(self) -> bool:
        """One health ping; updates the circuit and returns whether Redis answered."""
        sent = time.monotonic()
        try:
            await asyncio.wait_for(self._ping(), self.timeout)
        except _PING_ERRORS as exc:
            self._failed += 1
            silent = self._last_reply < sent  # nothing else came back from Redis while the ping waited
            if not self.open and self._failed >= self.failures and silent:
                self._trip(f"{type(exc).__name__} on {self._failed} health pings")
            return False
        self._failed = 0
        self.replied()
        if self.open:
            log.warning("redis answers again: circuit closed")
            self.open, self.reason = False, ""
        return True

    def _trip(self, reason: str) -> None:
        self.open, self.reason = True, reason
        log.error("redis unavailable (%s): circuit open", reason)
        for callback in self._on_open:
            callback()

    async def _run(self) -> None:
        while not self._closing:
            await self.check()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
