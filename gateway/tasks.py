"""Background tasks the worker owns: shutdown waits for them, even when their requester is gone."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
_background: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task the shutdown waits for (``drain_background_tasks``), even if its requester is gone."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


async def drain_background_tasks(grace_seconds: float) -> None:
    """Wait (at shutdown) for upstream calls and streams still being read after their clients went away."""
    # Only this loop's tasks: one left behind by a loop that has since closed (an app run in-process and
    # stopped) would never complete, and waiting on it would hold shutdown for the whole grace period.
    loop = asyncio.get_running_loop()
    mine = [task for task in _background if task.get_loop() is loop]
    if mine:
        await asyncio.wait(mine, timeout=grace_seconds)
