"""Processes the benchmarks start (redis-server, fake upstream, gateway, relays) and their memory.

Each process is started on a free loopback port, waited for by polling, and stopped by
its own PID (SIGTERM, then SIGKILL), so nothing the bench did not start is touched.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "redis-server"
OUT_DIR = Path(__file__).resolve().parent / "out"  # logs; ignored by git


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise this process's (and so its children's) open-file limit as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Proc:
    """A child process with its log under bench/out/; ready when ``ready()`` is true."""

    def __init__(self, name: str, args: Sequence[str], port: int, env: dict[str, str] | None = None,
                 cpus: set[int] | None = None) -> None:
        self.name = name
        self.cpus = cpus
        self.args = list(args)
        self.port = port
        self.env = {**os.environ, **(env or {})}
        OUT_DIR.mkdir(exist_ok=True)
        self.log_path = OUT_DIR / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready: Callable[[], bool], timeout: float = 30.0) -> Proc:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        if self.cpus:  # before it forks any worker: they inherit it
            os.sched_setaffinity(self.proc.pid, self.cpus)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            if ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s; see {self.log_path}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        tree = process_tree(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for pid in tree[1:]:  # workers a killed supervisor left behind (only the ones it started)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass(frozen=True)
class CpuPlan:
    """Which CPUs the process under test gets, and which the rest (upstream, Redis, load generator)."""

    subject: set[int] | None = None  # None: not pinned
    rest: set[int] | None = None

    def describe(self) -> str:
        if self.subject is None:
            return "not pinned: every process may run on any CPU"
        return (f"pinned: the process under test on CPU {_cpus(self.subject)}; fake upstream, redis-server and the "
                f"load generator on CPU {_cpus(self.rest or set())}")


def _cpus(cpus: set[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


def cpu_plan(subject_cpus: int, pin: bool) -> CpuPlan:
    """Pin the process under test to its own CPUs (when there are more) and pin this process to the rest.

    Its children (the fake, redis, wrk) inherit the rest; on a small machine this keeps the
    scheduler from moving the measured worker onto the load generator's core between runs.
    """
    available = sorted(os.sched_getaffinity(0))
    if not pin or len(available) <= subject_cpus:
        return CpuPlan()
    plan = CpuPlan(set(available[:subject_cpus]), set(available[subject_cpus:]))
    assert plan.rest
    os.sched_setaffinity(0, plan.rest)
    return plan


def start_redis(workdir: Path) -> Proc:
    port = free_port()
    proc = Proc("redis", [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"], port)
    return proc.start(lambda: _port_open(port))


def start_fake(key: str, *extra: str, name: str = "fake-upstream") -> Proc:
    port = free_port()
    proc = Proc(name, [sys.executable, "-m", "gateway", "fake-upstream", "--port", str(port), "--key", key,
                       *extra], port)
    return proc.start(lambda: _http_ok(f"http://127.0.0.1:{port}/healthz"))


def start_gateway(config: Path, env: dict[str, str], workers: int, cpus: set[int] | None = None) -> Proc:
    port = free_port()
    proc = Proc("gateway", [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--host",
                            "127.0.0.1", "--port", str(port), "--workers", str(workers)], port, env, cpus)
    # Ready means Redis answered and the config loaded, in at least one worker.
    return proc.start(lambda: _http_ok(f"http://127.0.0.1:{port}/readyz"), timeout=60)


# --- memory --------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (uvicorn's workers under the supervisor)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += _children(p)
    return tree


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants so far."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        except (OSError, IndexError, ValueError):
            pass
    return total / _TICK


def children_cpu_seconds() -> float:
    """CPU time of this process's finished, waited-for children (wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class OtherLoad:
    """CPU that processes other than this one and its children used meanwhile (someone's tests, ...).

    /proc/stat's user and system time less this process's and its reaped children's: read ``share()``
    after every child has been stopped and waited for.
    """

    def __enter__(self) -> OtherLoad:
        self._start = (self._machine_busy(), self._own(), time.monotonic())
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    @staticmethod
    def _machine_busy() -> float:
        # user, nice, system: what processes were charged. Interrupt and softirq time (loopback
        # traffic, our own mostly) and steal are left out, as they are of no process's rusage.
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:4]]
        return sum(fields) / _TICK

    @staticmethod
    def _own() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def share(self) -> float:
        """Cores the other processes kept busy on average (1.0: one core)."""
        busy, own, started = self._start
        elapsed = time.monotonic() - started
        return max(self._machine_busy() - busy - (self._own() - own), 0.0) / elapsed


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` and its descendants, from /proc/PID/statm."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


class RssSampler:
    """Samples a process tree's RSS in a thread; ``peak`` is the largest sample."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))
