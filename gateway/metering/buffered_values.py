"""Multiprocess metric values kept in the worker's memory and written to its files in batches.

prometheus-client's multiprocess mode (``values.MultiProcessValue``) writes the worker's mmap'd
file on every inc and observe, under a lock and after a pid check: ~11 writes a relayed request,
twice the CPU of values in memory (bench/RESULTS.md, issue 9). ``BufferedValue`` keeps each value
in memory, marks it dirty when it changes, and ``flush()`` writes the dirty ones. The worker
flushes every ``metrics.flush_seconds``, before it renders /metrics, and at shutdown
(``flushing``): a clean stop loses nothing; a SIGKILLed worker loses at most one interval of
counts (the billing ledger in Redis is written apart and loses nothing).

What this relies on in prometheus-client (pyproject.toml bounds the version;
tests/metering/test_buffered_values.py fails if any of it changes):

- every metric child gets its values from ``prometheus_client.values.ValueClass(typ, metric_name,
  name, labelnames, labelvalues, help_text, multiprocess_mode=...)``, looked up when the child is
  created: setting the attribute before the first metric exists (``install``) is enough;
- the files are those ``MultiProcessValue`` writes: ``{type}_{pid}.db``, and
  ``gauge_{mode}_{pid}.db`` for gauges, in ``PROMETHEUS_MULTIPROC_DIR``, one ``MmapedDict`` per
  file and process, keys from ``mmap_key``. ``MultiProcessCollector`` reads them by those names,
  and a value is written as ``MultiProcessValue`` writes it (value, and timestamp or 0.0);
- after a fork, a child starts from its own files (``MultiProcessValue`` re-reads them when it
  sees a new pid; here an ``os.register_at_fork`` hook does it once instead of a pid check per call).

Two writers of one file in one process would corrupt it (each keeps its own index of the file),
so every value of a process must be a ``BufferedValue``: ``install`` runs when
gateway/metering/metrics.py is imported, before any metric is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict, mmap_key

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
log = logging.getLogger("gateway")


def buffered_value_class() -> Any:
    """A new value class with its own state (files, dirty values, lock), as ``MultiProcessValue()`` makes one."""
    files: dict[str, MmapedDict] = {}
    created: list[Any] = []
    dirty: list[Any] = []
    lock = threading.Lock()  # the hot path runs on the event loop; the lock is for the odd other thread

    class BufferedValue:
        """A float in memory, written to this process's multiprocess file by ``flush``."""

        _multiprocess = True
        __slots__ = ("_dirty", "_file", "_key", "_params", "_timestamp", "_value")

        def __init__(self, typ: str, metric_name: str, name: str, labelnames: Any, labelvalues: Any,
                     help_text: str, multiprocess_mode: str = "", **kwargs: Any) -> None:
            self._params = typ, metric_name, name, labelnames, labelvalues, help_text, multiprocess_mode
            self._dirty = False
            with lock:
                self._reset()
                created.append(self)

        def _reset(self) -> None:
            """Open (or reuse) this process's file for the value's type and read the value from it."""
            typ, metric_name, name, labelnames, labelvalues, help_text, mode = self._params
            prefix = f"{typ}_{mode}" if typ == "gauge" else typ
            file = files.get(prefix)
            if file is None:
                path = os.path.join(os.environ[MULTIPROC_ENV], f"{prefix}_{os.getpid()}.db")
                file = files[prefix] = MmapedDict(path)
            self._file = file
            self._key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
            # Creates the entry (at 0): the series shows on /metrics from creation, as before.
            self._value, self._timestamp = file.read_value(self._key)

        def inc(self, amount: float) -> None:
            with lock:
                self._value += amount
                self._timestamp = 0.0
                if not self._dirty:
                    self._dirty = True
                    dirty.append(self)

        def set(self, value: float, timestamp: float | None = None) -> None:
            with lock:
                self._value = value
                self._timestamp = timestamp or 0.0
                if not self._dirty:
                    self._dirty = True
                    dirty.append(self)

        def get(self) -> float:
            with lock:
                return self._value  # type: ignore[no-any-return]

        def set_exemplar(self, exemplar: Any) -> None:
            return  # no exemplars in multiprocess mode, as MultiProcessValue

        def get_exemplar(self) -> None:
            return None

        @staticmethod
        def flush() -> int:
            """Write every value changed since the last flush to the files; returns how many."""
            with lock:
                for value in dirty:
                    value._file.write_value(value._key, value._value, value._timestamp)
                    value._dirty = False
                count = len(dirty)
                dirty.clear()
                return count

        @staticmethod
        def after_fork_in_child() -> None:
            """The child's values start from the child's own files, as after MultiProcessValue's pid check."""
            nonlocal lock
            lock = threading.Lock()  # another thread may have held it at the fork
            for file in files.values():
                file.close()
            files.clear()
            dirty.clear()
            for value in created:
                value._dirty = False
                value._reset()

    return BufferedValue


_installed: Any = None


def install() -> bool:
    """With ``PROMETHEUS_MULTIPROC_DIR`` set, make new metrics' values buffered; True when they are."""
    global _installed
    if _installed is None and os.environ.get(MULTIPROC_ENV):
        _installed = values.ValueClass = buffered_value_class()
        os.register_at_fork(after_in_child=_installed.after_fork_in_child)
    return _installed is not None


def flush() -> int:
    """Write this process's changed values to its files (nothing to do when not installed)."""
    return _installed.flush() if _installed is not None else 0  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def flushing(seconds: float) -> AsyncIterator[None]:
    """Flush every ``seconds`` while inside, and once more on the way out, so a clean stop loses nothing."""
    if _installed is None:
        yield
        return

    async def every_interval() -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                flush()
            except Exception:  # a bug; the next interval tries again rather than stop flushing for good
                log.exception("metrics flush failed")

    task = asyncio.create_task(every_interval())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        flush()
