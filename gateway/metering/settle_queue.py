"""Settlements that could not reach Redis: a bounded in-memory queue, retried, then a spool file.

``SettleQueue.settle`` makes one attempt on the request path; on a Redis error the
settlement joins the queue (``gateway_usage_pending_settlements``) and a background task
retries it with exponential backoff (``BACKOFF_START`` doubling up to ``BACKOFF_CAP``), in
order. The request never waits on a retry. At shutdown (``close``) whatever is still
queued is appended to the spool file (``usage.spool_path``, JSON lines, fsync'd); a full
queue spills there too. At start (``start``) a worker claims the spool by renaming it and
replays it; the claimed file is deleted once everything from it has been settled or
spooled again. Replays are harmless: ``settle.lua`` is idempotent on the request id.

Several workers share one spool path safely: appends take an exclusive ``flock`` and
re-open the file if a claimer renamed it meanwhile (same path, different inode), and a
claim renames under the same lock, so no line is written into a file already read.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import logging
import os
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from gateway.limits.limiter import Admission, Limiter, SettledUsage, utc_periods
from gateway.metering.metrics import Metrics
from gateway.redisdb.client import REDIS_ERRORS
from gateway.redisdb.keys import RedisKeys

log = logging.getLogger("gateway.settle")

BACKOFF_START = 0.05
BACKOFF_CAP = 5.0
_CLAIMED = ".replaying"


@dataclass(frozen=True, slots=True)
class Settlement:
    """One finished request's settle call: the admission, the usage and the ledger record."""

    admission: Admission
    usage: SettledUsage
    record: dict[str, str]

    def to_json(self) -> bytes:
        adm = {k: v for k, v in asdict(self.admission).items() if k != "headers"}
        return orjson.dumps({"admission": adm, "usage": asdict(self.usage), "record": self.record})

    @classmethod
    def from_json(cls, line: bytes) -> Settlement:
        data = orjson.loads(line)
        return cls(Admission(**data["admission"], headers={}), SettledUsage(**data["usage"]),
                   {str(k): str(v) for k, v in data["record"].items()})


def unmetered_admission(request_id: str, user: str, started_ms: int) -> Admission:
    """An Admission for a request served without one (Redis down, policy allow): nothing reserved.

    settle.lua then only adds the usage to the day and month of ``started_ms`` and appends the record.
    """
    periods = utc_periods(started_ms)
    return Admission(request_id=request_id, user=user, now_ms=started_ms, lease_deadline_ms=started_ms,
                     day=periods.day, month=periods.month, reserved_tokens=0, reserved_images=0,
                     reserved_usd_micros=0, headers={})


class Spool:
    """An append-only JSON-lines file of settlements, shared by the workers of one host."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mine: set[str] = set()  # files this process claimed (a restarted container may reuse a pid)

    def append(self, settlements: Iterable[Settlement]) -> int:
        """Append and fsync; returns how many were written."""
        lines = b"".join(s.to_json() + b"\n" for s in settlements)
        if not lines:
            return 0
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # claimed (renamed) while we waited for the lock: use the new file
                    continue
                os.write(fd, lines)
                os.fsync(fd)
                return lines.count(b"\n")
            finally:
                os.close(fd)

    def claim(self) -> list[tuple[str, list[Settlement]]]:
        """Take the spool and any claimed file a dead process left: (claimed path, settlements) each."""
        claimed = []
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            fd = -1
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                target = f"{self.path}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_CLAIMED}"
                try:
                    if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                        os.rename(self.path, target)
                        claimed.append(target)
                        self._mine.add(target)
                except FileNotFoundError:
                    pass  # another worker claimed it first
            finally:
                os.close(fd)
        for orphan in glob.glob(glob.escape(self.path) + ".*" + _CLAIMED):
            if orphan not in self._mine and not _pid_alive(orphan[len(self.path) + 1:].split(".")[0]):
                target = f"{self.path}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_CLAIMED}"
                with contextlib.suppress(FileNotFoundError):
                    os.rename(orphan, target)
                    claimed.append(target)
                    self._mine.add(target)
        return [(path, _read_settlements(path)) for path in claimed]


def _pid_alive(text: str) -> bool:
    try:
        pid = int(text)
    except ValueError:
        return True  # not ours to take
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_settlements(path: str) -> list[Settlement]:
    out = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(Settlement.from_json(line))
            except (ValueError, TypeError, KeyError):
                # A torn last line (crash mid-write) is the only way to get here; say so, keep the rest.
                log.error("usage spool %s line %d is not a settlement; skipped", path, n)
    return out


class SettleQueue:
    """Settles through the limiter; what Redis refuses is retried in the background, then spooled."""

    def __init__(self, limiter: Limiter, metrics: Metrics, *, redis: Any = None,
                 keys: RedisKeys | None = None, max_size: int = 100_000, spool: Spool | None = None) -> None:
        self.limiter = limiter
        self.metrics = metrics
        self.redis = redis  # for the users index; None: not kept
        self.keys = keys or limiter.keys
        self.max_size = max_size
        self.spool = spool
        self.pending: deque[Settlement] = deque()
        self._users: set[str] = set()  # users this process has put in the users index
        self._task: asyncio.Task[None] | None = None
        self._claimed: list[str] = []
        self._closed = False

    async def start(self) -> None:
        """Replay what a previous run spooled (in the background: the worker starts serving at once)."""
        if self.spool is None:
            return
        for path, settlements in await asyncio.to_thread(self.spool.claim):
            self._claimed.append(path)
            log.info("replaying %d spooled settlements from %s", len(settlements), path)
            for s in settlements:
                self._enqueue(s)
        if not self.pending:
            self._forget_claimed()
        self._wake()

    async def settle(self, settlement: Settlement) -> None:
        """Settle now if Redis answers, else queue it; never raises, never waits on a retry."""
        if self._closed and self.spool is not None:
            # A stream drained after shutdown began: straight to the spool, replayed at the next start.
            if not await self._try(settlement):
                self.spool.append([settlement])
            return
        if not self.pending and await self._try(settlement):
            return
        self._enqueue(settlement)
        self._wake()

    async def _try(self, settlement: Settlement) -> bool:
        try:
            user = settlement.admission.user
            if self.redis is not None and user not in self._users:
                await self.redis.sadd(self.keys.users(), user)
                self._users.add(user)
            await self.limiter.settle(settlement.admission, settlement.usage, settlement.record)
        except REDIS_ERRORS as exc:
            self.metrics.redis_errors.labels("settle").inc()
            log.warning("settle of %s failed (%s); queued for retry", settlement.admission.request_id,
                        type(exc).__name__)
            return False
        except Exception as exc:  # not Redis: retrying would not help; keep it on disk for an operator
            log.error("settle of %s failed (%s); kept in the spool", settlement.admission.request_id,
                      type(exc).__name__)
            if self.spool is not None:
                self.spool.append([settlement])
        return True

    def _enqueue(self, settlement: Settlement) -> None:
        if len(self.pending) >= self.max_size and self.spool is not None:
            # Full: the disk keeps it until the next start rather than dropping billed usage.
            self.spool.append([settlement])
            log.error("settle queue full (%d); %s spooled to %s", self.max_size,
                      settlement.admission.request_id, self.spool.path)
            return
        self.pending.append(settlement)
        self.metrics.usage_pending.set(len(self.pending))

    def _wake(self) -> None:
        if self.pending and not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._retry_loop())

    async def _retry_loop(self) -> None:
        delay = BACKOFF_START
        while self.pending and not self._closed:
            if await self._try(self.pending[0]):
                self.pending.popleft()
                self.metrics.usage_pending.set(len(self.pending))
                delay = BACKOFF_START
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_CAP)
        if not self.pending:
            self._forget_claimed()

    def _forget_claimed(self) -> None:
        """Everything replayed from the claimed files is settled: they are no longer needed."""
        for path in self._claimed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._claimed.clear()

    async def close(self) -> None:
        """Stop retrying; one last attempt, then spool whatever Redis did not take."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.pending and await self._try(self.pending[0]):
            self.pending.popleft()
            while self.pending and await self._try(self.pending[0]):
                self.pending.popleft()
        if self.pending:
            if self.spool is None:
                log.error("%d settlements lost at shutdown: no usage.spool_path", len(self.pending))
            else:
                written = await asyncio.to_thread(self.spool.append, list(self.pending))
                log.warning("spooled %d unsettled settlements to %s", written, self.spool.path)
            self.pending.clear()
        self.metrics.usage_pending.set(0)
        self._forget_claimed()
