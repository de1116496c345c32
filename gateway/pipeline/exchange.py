"""One request's life through the gateway: who, what, what it was admitted for, what happened."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gateway.auth.authenticator import Principal
from gateway.upstream.observe import Usage
from gateway.pipeline.request import ImageRequest


@dataclass(slots=True)
class Exchange:
    request_id: str
    principal: Principal
    request: ImageRequest
    started: float = field(default_factory=time.monotonic)  # monotonic, for latency
    started_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)  # wall clock, for records
    estimate: Any = None  # pricing.Estimate reserved at admission
    admission: Any = None  # limits.Admission when Redis admitted it; None when unmetered
    status: int = 0  # the status the client got (the upstream's, or the gateway's own error)
    usage: Usage = field(default_factory=Usage)
    upstream_seconds: float | None = None
    error_reason: str | None = None  # upstream failure reason for metrics (timeout, unavailable, ...)
    incomplete: bool = False  # a stream ended without its completed event
    client_gone: bool = False

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and self.error_reason is None
