"""The ``limits:`` section's settings (leases); parsed by gateway/config.py, which has no room left.

Kept free of imports from the rest of the gateway, so config.py can import it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LeaseSettings:
    lease_slack_seconds: float = 60.0  # a lease (slot + reservation) lasts upstream.timeout_seconds plus this
    sweep_interval_seconds: float = 30.0  # each worker records leases that expired unsettled (worker died)
