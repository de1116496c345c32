"""The ``idempotency:`` section's settings; parsed by gateway/config.py (kept free of gateway imports)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IdempotencySettings:
    ttl_seconds: int = 86400  # how long a key and its stored answer are kept
