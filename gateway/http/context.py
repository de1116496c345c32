"""What a handler reads off its request: the worker's Gateway (lifespan state) and the request id."""

from __future__ import annotations

import os
import time

from starlette.requests import Request
from starlette.types import Scope

from gateway.pipeline.gateway import Gateway


def gateway_of(request: Request) -> Gateway:
    return request.state.gateway  # type: ignore[no-any-return]


def new_request_id() -> str:
    """32 random hex digits, as ``uuid4().hex`` gave, at a fifth of its cost (no UUID object): 0.9 vs 4.2 us."""
    return os.urandom(16).hex()


def request_id_of(request: Request) -> str:
    rid = request.scope.get("request_id")
    if rid is None:
        rid = request.scope["request_id"] = new_request_id()
    return rid  # type: ignore[no-any-return]


def stamp(scope: Scope) -> str:
    """Give a new request its id and the instant it was received (latency counts from here)."""
    scope["received"] = (time.monotonic(), time.time_ns() // 1_000_000)
    rid = scope["request_id"] = new_request_id()
    return rid


def received_of(request: Request) -> tuple[float, int]:
    """(monotonic seconds, wall-clock ms) when the request was received; now if it was never stamped."""
    received = request.scope.get("received")
    if received is None:
        received = request.scope["received"] = (time.monotonic(), time.time_ns() // 1_000_000)
    return received  # type: ignore[no-any-return]
