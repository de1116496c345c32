"""The intake: requests go through admission to the upstream call in arrival order, a few at a time.

An asyncio worker runs every ready request one step at a time, in turn. When thousands
arrive together, each of them takes a step (read, authenticate, admit, connect upstream,
send), goes to the back of the line, and waits for all the others to take theirs: they
advance in lockstep, and the median request reaches the upstream only when nearly the whole
burst has done its intake work. Behind this gate at most ``limit`` requests are between
entering it (before admission) and their upstream call; the rest wait in arrival order. The
first half of a burst then reaches the upstream after about half of the burst's intake work:
with 5,000 requests sent at once, the median answer came +2.38 s after direct instead of
+5.36 s (quiet full runs of both commits on the same machine, bench/RESULTS.md). A slot is held for the
admission's CPU and Redis round trip, never for network waits towards the upstream (connect,
TLS, upload) nor its answer: steady traffic does not wait here.

Contract of ``Intake``:

- ``await enter(deadline)`` gives a ``Slot`` at once while fewer than ``limit`` are held and
  nobody waits; otherwise the caller waits, first come first served;
- it raises ``Shed("queue_full")`` at once when ``max_waiting`` callers already wait, and
  ``Shed("deadline")`` when no slot comes before ``deadline`` (``time.monotonic()``);
- a slot is handed straight to the first waiter when released; ``Slot.release()`` may be
  called any number of times (only the first counts). A waiter that is cancelled or times
  out as a slot reaches it passes the slot on, so no slot is ever lost.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from gateway.redisdb.batcher import Shed


class Slot:
    """A place in the intake; ``release()`` gives it to the next waiter (idempotent)."""

    __slots__ = ("_intake",)

    def __init__(self, intake: Intake) -> None:
        self._intake: Intake | None = intake

    def release(self) -> None:
        intake, self._intake = self._intake, None
        if intake is not None:
            intake._pass_on()


class Intake:
    """At most ``limit`` slots held; waiters served in arrival order. See the module contract."""

    def __init__(self, limit: int, max_waiting: int) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self._free = limit
        self._waiters: deque[asyncio.Future[None]] = deque()  # may hold futures of departed waiters
        self._waiting = 0  # the live waiters among them

    @property
    def held(self) -> int:
        return self.limit - self._free

    @property
    def waiting(self) -> int:
        return self._waiting

    async def enter(self, deadline: float) -> Slot:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return Slot(self)
        if self._waiting >= self.max_waiting:
            raise Shed("queue_full")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._waiting += 1
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                await future
        except BaseException as exc:
            if future.done() and not future.cancelled():
                self._pass_on()  # a slot reached us as we gave up: it goes to the next waiter
            else:
                self._waiting -= 1  # its future stays queued, cancelled: _pass_on skips it
                future.cancel()
                if len(self._waiters) > 2 * self._waiting + 64:  # all slots stuck (a stalled Redis): tidy
                    self._waiters = deque(f for f in self._waiters if not f.done())
            if isinstance(exc, TimeoutError):
                raise Shed("deadline") from None
            raise
        return Slot(self)

    def _pass_on(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                self._waiting -= 1
                future.set_result(None)
                return
        self._free += 1
