"""Real processes for integration tests: redis-server, the fake upstream, the gateway.

Each is started on a free port and stopped by its own PID; nothing here touches a
server the tests did not start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

REDIS_SERVER = shutil.which("redis-server") or "redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, at most 65535) is free too."""
    while True:
        port = free_port()
        if port > 55_535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port


def wait_until(check: Any, what: str, timeout: float = 20.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Poll ``check()`` until it is truthy (readiness polling, not a sleep as synchronisation).

    An exception from ``check`` counts as "not yet"; at the timeout the last one is the cause.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if check():
                return
        except Exception as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s") from last


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class RedisServer:
    """A private redis-server on a free port (optionally a Cluster node)."""

    def __init__(self, port: int | None = None, *, cluster: bool = False, appendonly: bool = False) -> None:
        self.port = port or (cluster_port() if cluster else free_port())
        self.dir = tempfile.mkdtemp(prefix=f"igw-redis-{self.port}-")
        self.cluster = cluster
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--dir", self.dir, "--daemonize", "no",
                "--logfile", os.path.join(self.dir, "redis.log")]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: redis.Redis(port=self.port, socket_timeout=0.5).ping(), f"redis:{self.port}",
                   proc=self.proc)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _cluster_state(node: RedisServer) -> str:
    info = node.client().execute_command("CLUSTER INFO")  # redis-py parses it into a dict
    state = info.get("cluster_state") if isinstance(info, dict) else None
    return state.decode() if isinstance(state, bytes) else str(state)


class RedisCluster:
    """Three masters on free ports, joined with ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [RedisServer(cluster=True) for _ in range(masters)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
                            "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True,
                           timeout=60)
            wait_until(lambda: all(_cluster_state(n) == "ok" for n in self.nodes), "redis cluster")
        except BaseException:
            self.cleanup()  # never leak the nodes that did start
            raise
        return self

    def flush(self) -> None:
        for node in self.nodes:
            node.client().flushall()

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


class Service:
    """A child process serving HTTP on ``port``; ready when ``/healthz`` answers 200."""

    def __init__(self, args: list[str], port: int, env: Mapping[str, str | None] | None = None,
                 log: Path | None = None) -> None:
        self.args = args
        self.port = port
        # A None value removes the variable from the child's environment.
        self.env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
        self.log_path = log or Path(tempfile.mkstemp(prefix="igw-svc-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_path: str = "/healthz", timeout: float = 30.0) -> Service:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        wait_until(lambda: httpx.get(self.url + ready_path, timeout=1).status_code == 200,
                   " ".join(self.args[:4]), timeout=timeout, proc=self.proc)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop(self.proc, sig)
            self.proc = None
            self._log.close()


def start_fake_upstream(key: str = "tt-test-key", *extra: str) -> Service:
    port = free_port()
    return Service([sys.executable, "-m", "gateway", "fake-upstream", "--port", str(port), "--key", key, *extra],
                   port).start()


def start_gateway(config: Mapping[str, Any], env: Mapping[str, str | None], *extra: str, workers: int = 1,
                  tmp: Path | None = None) -> Service:
    """Start ``gateway serve`` with ``config`` written to a temp YAML file."""
    port = free_port()
    tmp = tmp or Path(tempfile.mkdtemp(prefix="igw-gw-"))
    path = tmp / f"gateway-{port}.yaml"
    # Each gateway its own usage spool: a shared default would replay one test's settlements in another.
    usage = {"spool_path": str(tmp / f"usage-{port}.spool"), **dict(config).get("usage", {})}
    path.write_text(yaml.safe_dump({**dict(config), "usage": usage}))
    full_env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp / f"prom-{port}"), **env}
    return Service([sys.executable, "-m", "gateway", "serve", "--config", str(path), "--host", "127.0.0.1",
                    "--port", str(port), "--workers", str(workers), *extra], port, full_env,
                   log=tmp / f"gateway-{port}.log").start()


@contextlib.asynccontextmanager
async def local_generations_server(handler: Any) -> AsyncIterator[str]:
    """An in-process aiohttp server answering POST /v1/images/generations with ``handler``; yields its URL."""
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/v1/images/generations", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def running(service: Service) -> Iterator[Service]:
    try:
        yield service
    finally:
        service.stop()


def module_fake_upstream(key: str, *args: str) -> Any:
    """A module-scoped pytest fixture: one fake upstream process for the module's tests, stopped after them."""

    @pytest.fixture(scope="module")
    def fake() -> Iterator[Service]:
        service = start_fake_upstream(key, *args)
        yield service
        service.stop()

    return fake
