"""One request's life through the gateway: who, what, what it was admitted for, what happened."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.auth.authenticator import Principal
from gateway.limits.limiter import Admission
from gateway.metering.pricing import Estimate
from gateway.pipeline.intake import Slot
from gateway.pipeline.request import GENERATIONS, ImageRequest
from gateway.upstream.observe import Usage

if TYPE_CHECKING:  # not at run time: the CLI imports this module, and the service imports metrics
    from gateway.idempotency.service import Ticket


@dataclass(slots=True)
class Exchange:
    request_id: str
    principal: Principal
    request: ImageRequest
    route: str = GENERATIONS
    started: float = field(default_factory=time.monotonic)  # monotonic, for latency
    started_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)  # wall clock, for records
    estimate: Estimate | None = None  # reserved at admission
    admission: Admission | None = None  # None when unmetered (no limiter, or Redis down and policy allow)
    status: int = 0  # the status the client got (the upstream's, or the gateway's own error)
    upstream_billed: bool = False  # a 2xx answer the client got as an error (wrong type): still billed
    usage: Usage = field(default_factory=Usage)
    upstream_seconds: float | None = None
    error_reason: str | None = None  # upstream failure reason for metrics (timeout, unavailable, ...)
    incomplete: bool = False  # a stream ended without its completed event
    client_gone: bool = False
    ticket: Ticket | None = None  # its Idempotency-Key claim: the answer is kept there, or the key released
    intake: Slot | None = None  # its place in the intake (pipeline/intake.py) until its upstream call
    admission_deadline: float | None = None  # monotonic: shed if admission has not begun by then

    def leave_intake(self) -> None:
        """Give up the intake slot (just before the upstream call, or on the way out); idempotent."""
        slot, self.intake = self.intake, None
        if slot is not None:
            slot.release()

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and self.error_reason is None
