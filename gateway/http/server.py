"""``gateway serve``: uvicorn (uvloop + httptools) with N workers and multiprocess metrics."""

from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry, start_http_server, values
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.config import ConfigError, ServerSettings, load_settings
from gateway.http.protocol import LimitedHttpToolsProtocol


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
    protocol: Any = http_protocol(settings.server)  # uvicorn calls it like a protocol class
    uvicorn.run("gateway.http.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                loop="uvloop", http=protocol, ws="none", lifespan="on", access_log=False, log_level="info",
                timeout_graceful_shutdown=int(os.environ.get("GATEWAY_GRACE_SECONDS", "120")),
                backlog=4096, timeout_keep_alive=settings.server.keep_alive_seconds)  # type: ignore[arg-type]
    return 0


def http_protocol(server: ServerSettings) -> functools.partial[LimitedHttpToolsProtocol]:
    """httptools with the header limits of SPEC section 3 (a partial: uvicorn adds its own arguments)."""
    return functools.partial(LimitedHttpToolsProtocol, max_header_bytes=server.max_header_bytes,
                             header_timeout=server.header_timeout_seconds)
