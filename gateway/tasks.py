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
    if _background:
        await asyncio.wait(list(_background), timeout=grace_seconds)
