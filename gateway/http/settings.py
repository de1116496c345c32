"""The ``server:`` section's settings (the HTTP server); parsed by gateway/config.py, which has no room left.

Kept free of imports from the rest of the gateway, so config.py can import it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    send_timeout_seconds: float = 60.0  # a client that takes none of a response's bytes this long is dropped
