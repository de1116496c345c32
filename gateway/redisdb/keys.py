"""The Redis key layout: every key the gateway uses is built here.

All keys of one user share the Cluster hash tag ``{u:<user>}``, so every script that
touches a user touches one slot. User names are restricted (validators.NAME_RE) so they
cannot break out of the tag.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "igw:"

    # --- per user (one hash tag) ---
    def user(self, user: str, suffix: str) -> str:
        return f"{self.prefix}{{u:{user}}}:{suffix}"

    def requests_window(self, user: str) -> str:
        return self.user(user, "rpm")

    def images_window(self, user: str) -> str:
        return self.user(user, "ipm")

    def inflight(self, user: str) -> str:
        return self.user(user, "inflight")

    def reservations(self, user: str) -> str:
        return self.user(user, "res")

    def day_usage(self, user: str, day: str) -> str:
        """Per-user usage of a UTC day (``YYYY-MM-DD``)."""
        return self.user(user, f"d:{day}")

    def month_usage(self, user: str, month: str) -> str:
        """Per-user usage of a UTC month (``YYYY-MM``)."""
        return self.user(user, f"m:{month}")

    def settled(self, user: str, request_id: str) -> str:
        """Marker that a request's usage was settled (makes a retried settle a no-op)."""
        return self.user(user, f"settled:{request_id}")

    def ledger(self, user: str) -> str:
        """Stream of the user's usage records, one per finished request."""
        return self.user(user, "ledger")

    def user_keys(self, user: str) -> str:
        """Set of key ids belonging to the user."""
        return self.user(user, "keys")

    def idempotency(self, user: str, key_digest: str) -> str:
        """Hash: the claim and stored answer of one Idempotency-Key (its SHA-256) of the user."""
        return self.user(user, f"idem:{key_digest}")
    def job_queue(self, user: str) -> str:
        """Stream of the user's queued and running jobs (consumer group ``runners``)."""
        return self.user(user, "jobs")

    def job(self, user: str, job_id: str) -> str:
        """Hash: one job's state, request and result."""
        return self.user(user, f"job:{job_id}")

    def job_list(self, user: str) -> str:
        """Sorted set: the user's job ids by creation ms (listings)."""
        return self.user(user, "joblist")

    def job_owner(self, job_id: str) -> str:
        """String: the user a job id belongs to (operators look jobs up by id alone)."""
        return f"{self.prefix}jobowner:{job_id}"

    def job_users(self) -> str:
        """Sorted set: users that may have queued jobs (runners go round it) -> first seen ms."""
        return f"{self.prefix}jobusers"

    def jobs_waiting(self) -> str:
        """Sorted set: ``user/job_id`` of every job not yet started -> creation ms (queue depth and age)."""
        return f"{self.prefix}jobswaiting"

    def job_uploads(self) -> str:
        """Sorted set: ``user/job_id`` of edit jobs whose files went to the store -> ms the upload began."""
        return f"{self.prefix}jobuploads"

    def webhook_due(self) -> str:
        """Sorted set: ``user/job_id`` of webhook deliveries -> when the next attempt is due (ms)."""
        return f"{self.prefix}webhooks"

    # --- keys (looked up by digest, not by user) ---
    def api_key(self, digest: str) -> str:
        """Hash: the key record under the SHA-256 of the key (never the key)."""
        return f"{self.prefix}key:{digest}"

    def api_key_id(self, key_id: str) -> str:
        """String: the digest of the key with this id (for revoke by id)."""
        return f"{self.prefix}keyid:{key_id}"

    def users(self) -> str:
        """Set of every user that has had a key created (for billing and listings)."""
        return f"{self.prefix}users"

    # --- brute-force guard (per client address; both keys share the hash tag {a:<address>}) ---
    def auth_failures(self, client: str) -> str:
        """Sorted set of recent failed authentications from a client address (score: ms)."""
        return f"{self.prefix}{{a:{client}}}:authfail"

    def auth_block(self, client: str) -> str:
        """String whose TTL is the time a client address's failing keys stay refused."""
        return f"{self.prefix}{{a:{client}}}:authblock"

    def admin_auth_failures(self, client: str) -> str:
        """Like ``auth_failures``, for wrong admin tokens (counted apart from API keys)."""
        return f"{self.prefix}{{a:{client}}}:adminfail"

    def admin_auth_block(self, client: str) -> str:
        """Like ``auth_block``, for wrong admin tokens."""
        return f"{self.prefix}{{a:{client}}}:adminblock"

    # --- admin console ---
    def console_session(self, digest: str) -> str:
        """Hash: a console session (its CSRF token), under the SHA-256 of the session cookie."""
        return f"{self.prefix}console:session:{digest}"

    def console_code(self, digest: str) -> str:
        """String: a one-time console sign-in code (``gateway demo``), under its SHA-256."""
        return f"{self.prefix}console:code:{digest}"
