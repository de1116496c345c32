"""``gateway serve``: uvicorn (uvloop + httptools with header limits), N workers, multiprocess metrics.

prometheus_client picks where metric values live (memory, or files every worker's /metrics
sums) when it is first imported, from ``PROMETHEUS_MULTIPROC_DIR``, and so does
gateway/metering/metrics.py (each worker's values in memory, flushed to its files in batches).
So this module imports them only inside ``serve``, after the variable is set; workers are new
processes and inherit it.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvicorn

from gateway.config import ConfigError, load_settings
from gateway.http.protocol import LimitedHttpToolsProtocol
from gateway.http.settings import ServerSettings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores() -> int:
    """CPUs this process may run on, capped by a cgroup v2 CPU quota (a container's CPU limit)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit visible: the affinity decides
    return cores


def prepare_multiprocess_dir(workers: int, separate_port: bool) -> str | None:
    """Set and empty PROMETHEUS_MULTIPROC_DIR (stale files would add dead workers' counts).

    One worker and no metrics port: unset instead, whatever the environment says. The one process
    holds every value, so they stay in memory: a file write per increment cost the worker ~12 us
    a request (11 writes). Returns the directory when this process created it (removed at exit).
    Must run before prometheus_client is imported.
    """
    if workers == 1 and not separate_port:
        os.environ.pop(MULTIPROC_ENV, None)
        return None
    path = os.environ.get(MULTIPROC_ENV)
    created = None
    if not path and (workers > 1 or separate_port):
        path = created = os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="gateway-metrics-")
    if created and "prometheus_client.values" in sys.modules:
        # Its values would stay in this process's memory, invisible to /metrics: a bug, not a setting.
        raise RuntimeError("prometheus_client was imported before gateway serve set " + MULTIPROC_ENV)
    if path and not created:
        shutil.rmtree(path, ignore_errors=True)
        Path(path).mkdir(parents=True, exist_ok=True)
    return created


def serve(config: str | None, *, host: str, port: int, workers: int | None) -> int:
    """Run the gateway until SIGTERM; 2 on a bad config."""
    if config:
        os.environ["GATEWAY_CONFIG"] = str(Path(config).resolve())  # each worker loads it
    try:
        settings = load_settings()  # fail now, with the key and the reason, not in each worker
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = settings.server
    workers = workers or server.workers or usable_cores()
    created = prepare_multiprocess_dir(workers, settings.metrics.port is not None)
    try:
        if settings.metrics.port is not None:
            from gateway.http.metrics_port import start_metrics_port

            start_metrics_port(host, settings.metrics.port, settings.metrics_token)
        protocol: Any = http_protocol(server)  # uvicorn calls it like a protocol class
        uvicorn.run("gateway.http.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                    loop="uvloop", http=protocol, ws="none", lifespan="on", access_log=False, log_level="info",
                    timeout_graceful_shutdown=server.grace_seconds,  # type: ignore[arg-type]
                    backlog=4096, timeout_keep_alive=server.keep_alive_seconds)  # type: ignore[arg-type]
    finally:
        if created:
            shutil.rmtree(created, ignore_errors=True)
    return 0


def http_protocol(server: ServerSettings) -> functools.partial[LimitedHttpToolsProtocol]:
    """httptools with the header and body limits of SPEC section 3 (a partial: uvicorn adds its own arguments)."""
    return functools.partial(LimitedHttpToolsProtocol, max_header_bytes=server.max_header_bytes,
                             header_timeout=server.header_timeout_seconds, body_timeout=server.body_timeout_seconds,
                             body_min_rate=server.body_min_bytes_per_second)
