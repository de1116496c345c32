"""``gateway serve``: uvicorn (uvloop + httptools) with N workers and multiprocess metrics."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import uvicorn
from prometheus_client import CollectorRegistry, start_http_server, values
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.config import ConfigError, load_settings


def prepare_multiprocess_dir(workers: int, separate_port: bool) -> None:
    """Empty PROMETHEUS_MULTIPROC_DIR at start (stale files would add dead workers' counts)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path and (workers > 1 or separate_port):
        path = os.environ["PROMETHEUS_MULTIPROC_DIR"] = f"/tmp/gateway-prometheus-{os.getpid()}"
    if path:
        shutil.rmtree(path, ignore_errors=True)
        Path(path).mkdir(parents=True, exist_ok=True)
        # prometheus_client picks its value class when first imported, maybe before the variable was set;
        # pick again so a single in-process worker writes the files /metrics reads.
        values.ValueClass = values.get_value_class()


def serve(config: str | None, *, host: str, port: int, workers: int | None) -> int:
    if config:
        os.environ["GATEWAY_CONFIG"] = str(Path(config).resolve())
    try:
        settings = load_settings()  # fail now, with the key and the reason, not in each worker
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    workers = workers or int(os.environ.get("GATEWAY_WORKERS", "1"))
    prepare_multiprocess_dir(workers, settings.metrics.port is not None)
    if settings.metrics.port is not None:
        # Served by this (supervisor) process from the workers' multiprocess files.
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        start_http_server(settings.metrics.port, addr=host, registry=registry)
    uvicorn.run("gateway.http.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                loop="uvloop", http="httptools", lifespan="on", access_log=False, log_level="info",
                timeout_graceful_shutdown=int(os.environ.get("GATEWAY_GRACE_SECONDS", "120")),
                backlog=4096, timeout_keep_alive=75)
    return 0
