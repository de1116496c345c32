"""The ``jobs:`` section's settings; parsed by gateway/config.py, which has no room left.

Kept free of imports from the rest of the gateway, so config.py can import it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobsSettings:
    ttl_seconds: int = 7 * 86_400  # a job's state and result are kept this long
    concurrency: int = 32  # jobs one worker runs at once (beyond each user's own limits)
    visibility_timeout_seconds: float = 60.0  # a job whose runner stopped heartbeating is re-run after this
    poll_seconds: float = 0.2  # how often an idle runner looks for new jobs
    allow_private_webhooks: bool = False  # webhooks to loopback, private and link-local addresses
    webhook_retry_seconds: float = 86_400.0  # non-2xx deliveries are retried with backoff this long
    webhook_first_retry_seconds: float = 5.0  # the first retry's delay; each next one doubles (at most 1 h)
    webhook_timeout_seconds: float = 10.0  # one delivery attempt, connect to last byte
    upload_grace_seconds: float = 600.0  # an edit's files stored this long ago without a job are deleted
