"""The usage spool: settlements Redis did not take, kept on disk until the next start replays them.

A JSON-lines file (``usage.spool_path``), shared by the workers of one host. By default it lives
in a private directory (``config.default_spool_path``: ``$XDG_STATE_HOME/gateway/`` or
``~/.local/state/gateway/``, created 0700), never in a world-writable one such as ``/tmp``,
where anyone could plant a file to be replayed into billing; a world-writable directory
without the sticky bit is refused.

Every file is opened with ``O_NOFOLLOW | O_NONBLOCK`` and must be a regular file owned by this
process's user: a symlink is not followed, a FIFO cannot hang startup, and a foreign file is
reported and skipped, never replayed or written to. Any ``OSError`` is returned to the caller,
who reports it (``SettleQueue``); none stops the gateway from starting.

Appends take an exclusive ``flock`` and re-open the file if a claimer renamed it meanwhile
(same path, different inode); a claim renames under the same lock and reads through the
descriptor it checked, so no line is written into a file already read, and what is replayed is
the file that was checked. These calls block (fsync): run them in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import stat
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import orjson

from gateway.limits.limiter import Admission, SettledUsage

log = logging.getLogger("gateway.settle")

_CLAIMED = ".replaying"
_SAFE_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


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


class UnsafeSpoolFile(OSError):
    """A spool path that is not a regular file of ours (symlink, FIFO, another user's file)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(errno.EPERM, reason, path)


def describe(exc: OSError) -> str:
    """An OSError for a log line: the path and the reason, nothing else."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ELOOP:
        reason = "is a symbolic link (not followed)"
    return f"{exc.filename}: {reason}" if exc.filename else reason


def _check_ours(fd: int, path: str) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeSpoolFile(path, "is not a regular file")
    if st.st_uid != os.geteuid():
        raise UnsafeSpoolFile(path, f"is owned by uid {st.st_uid}, not by this process (uid {os.geteuid()})")
    return st


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    return b"".join(parts)


class Spool:
    """An append-only JSON-lines file of settlements, shared by the workers of one host."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._mine: set[str] = set()  # files this process claimed (a restarted container may reuse a pid)

    def _private_dir(self) -> None:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeSpoolFile(directory, "is not a directory")
        if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
            raise UnsafeSpoolFile(directory, "is world-writable; give the spool a private directory")

    def append(self, settlements: Iterable[Settlement]) -> int:
        """Append and fsync; returns how many were written. Blocks: call it in a thread."""
        lines = b"".join(s.to_json() + b"\n" for s in settlements)
        if not lines:
            return 0
        self._private_dir()
        while True:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _SAFE_OPEN, 0o600)
            try:
                _check_ours(fd, self.path)
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
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
        """Take the spool and any claimed file a dead process left: (claimed path, settlements) each.

        A file that cannot be taken safely is reported and left where it is.
        """
        sources = [self.path]
        for orphan in glob.glob(glob.escape(self.path) + ".*" + _CLAIMED):
            if orphan not in self._mine and not _pid_alive(orphan[len(self.path) + 1:].split(".")[0]):
                sources.append(orphan)
        claimed = []
        for source in sources:
            try:
                taken = self._take(source)
            except FileNotFoundError:
                continue  # nothing there, or another worker took it first
            except OSError as exc:
                log.error("usage spool file skipped, not replayed: %s", describe(exc))
                continue
            if taken is not None:
                claimed.append(taken)
        return claimed

    def _take(self, source: str) -> tuple[str, list[Settlement]] | None:
        fd = os.open(source, os.O_RDONLY | _SAFE_OPEN)
        try:
            checked = _check_ours(fd, source)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.lstat(source).st_ino != checked.st_ino:
                return None  # renamed by another worker while we waited for the lock
            target = f"{self.path}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_CLAIMED}"
            os.rename(source, target)
            self._mine.add(target)
            data = _read_all(fd)  # through the descriptor checked above, whatever the path now holds
        finally:
            os.close(fd)
        return target, _parse(data, target)


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


def _parse(data: bytes, path: str) -> list[Settlement]:
    out = []
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(Settlement.from_json(line))
        except (ValueError, TypeError, KeyError):
            # A torn last line (crash mid-write) is the only way to get here; say so, keep the rest.
            log.error("usage spool %s line %d is not a settlement; skipped", path, n)
    return out


def remove_claimed(paths: Iterable[str]) -> None:
    """Delete claimed files whose settlements are all settled or spooled again."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
