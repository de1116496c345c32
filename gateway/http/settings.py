"""The ``server:`` section of the config: worker processes, shutdown grace, connection limits.

A flat dataclass parsed by ``gateway.config`` (``_section``, with its environment overrides),
which has no room left; kept free of imports from the rest of the gateway, so config.py can
import it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    workers: int | None = None  # uvicorn worker processes; None: the usable cores (GATEWAY_WORKERS)
    grace_seconds: float = 120.0  # in-flight requests may finish after SIGTERM (GATEWAY_GRACE_SECONDS)
    max_header_bytes: int = 65536  # request line and headers; beyond it 431 (SPEC section 3)
    header_timeout_seconds: float = 30.0  # to send complete headers; beyond it the connection is closed
    body_timeout_seconds: float = 30.0  # a body with no byte this long is cut (408); also the rate's grace
    body_min_bytes_per_second: float = 8192.0  # a body slower than this (after the grace) is cut (408)
    keep_alive_seconds: float = 75.0  # idle keep-alive; longer than a proxy's (60 s), so it closes first
    send_timeout_seconds: float = 60.0  # a client that takes none of a response's bytes this long is dropped
    intake_concurrency: int = 64  # requests between admission and the upstream send at once (pipeline/intake.py)
