"""Idempotency-Key for one worker: claim the key, wait for a running first request, replay, keep.

``begin`` answers with a ``Ticket``: either the stored answer to replay, or the claim of a
request that now runs and later ``conclude``s: its answer kept (the upstream may have billed it)
or its claim released (the gateway refused it itself, so the key can be used again).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from gateway.errors import GatewayError, IdempotencyKeyInUse, IdempotencyKeyReused, ServiceUnavailable
from gateway.idempotency.answers import Answer
from gateway.idempotency.header import HEADER
from gateway.idempotency.store import ClaimState, IdempotencyStore
from gateway.metering.metrics import Metrics
from gateway.redisdb.client import REDIS_ERRORS

log = logging.getLogger("gateway.idempotency")
FIRST_POLL_SECONDS = 0.05
MAX_POLL_SECONDS = 1.0


class Idempotency:
    """Claims and answers of Idempotency-Keys for the worker's requests."""

    def __init__(self, store: IdempotencyStore, metrics: Metrics, *, lease_seconds: float, wait_seconds: float,
                 serve_unguarded: bool) -> None:
        self.store = store
        self.metrics = metrics
        self.lease_ms = int(lease_seconds * 1000)
        self.wait_seconds = wait_seconds  # a waiter outlives the holder's lease, then takes over
        self.serve_unguarded = serve_unguarded  # redis.on_unavailable: allow

    async def begin(self, user: str, key: str, route: str, fingerprint: str, request_id: str) -> Ticket:
        """Claim ``key`` for this request, waiting while another request holds it; or the replay."""
        fp = hashlib.sha256(f"{route}\n{fingerprint}".encode()).hexdigest()
        deadline = time.monotonic() + self.wait_seconds
        delay = FIRST_POLL_SECONDS
        while True:
            try:
                claim = await self.store.claim(user, key, fp, request_id, now_ms=time.time_ns() // 1_000_000,
                                               lease_ms=self.lease_ms)
            except REDIS_ERRORS as exc:
                self.metrics.redis_errors.labels("idempotency").inc()
                if self.serve_unguarded:
                    return Ticket(None, user, key, fp, request_id)
                raise ServiceUnavailable("The gateway's idempotency store is unavailable; try again shortly.") from exc
            if claim.state is ClaimState.CLAIMED:
                return Ticket(self, user, key, fp, request_id)
            if claim.state is ClaimState.MISMATCH:
                raise IdempotencyKeyReused(f"This {HEADER} was already used with a different request.", param=HEADER)
            if claim.answer is not None:
                self.metrics.idempotent_replays.labels(route).inc()
                return Ticket(None, user, key, fp, request_id, replay=claim.answer)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise IdempotencyKeyInUse(f"A request with this {HEADER} is still running; retry later.",
                                          param=HEADER)
            # Polling, not a subscription: the holder may be another replica, or dead (lease expiry).
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 1.5, MAX_POLL_SECONDS)


class Ticket:
    """One request's hold on an Idempotency-Key; ``replay`` set (the stored answer) when it only replays one."""

    def __init__(self, owner: Idempotency | None, user: str, key: str, fingerprint: str, token: str, *,
                 replay: Answer | None = None) -> None:
        self._owner = owner  # None: nothing to conclude (a replay, or Redis down and policy allow)
        self._user, self._key, self._fingerprint, self._token = user, key, fingerprint, token
        self.replay = replay
        # A stream's bytes as the client gets them, collected by the relay for the stored answer.
        self.tap: list[bytes] | None = [] if owner is not None else None

    async def conclude(self, answer: Answer | None) -> None:
        """Keep ``answer`` for the key's repeats, or (None: the gateway's own refusal) release the key."""
        owner = self._owner
        if owner is None:
            return
        self._owner = None  # concluded once
        try:
            if answer is None:
                await owner.store.release(self._user, self._key, self._token)
            else:
                await owner.store.complete(self._user, self._key, self._fingerprint, answer)
        except REDIS_ERRORS as exc:
            owner.metrics.redis_errors.labels("idempotency").inc()
            self._not_concluded(answer, exc)
        except GatewayError as exc:  # the image store failed (counted in gateway_storage_errors_total)
            self._not_concluded(answer, exc)

    def _not_concluded(self, answer: Answer | None, exc: BaseException) -> None:
        # The claim stays until its lease expires; then a repeat runs the request again.
        log.warning("idempotency: could not %s request %s's answer (%s)",
                    "release" if answer is None else "store", self._token, type(exc).__name__)

    async def release(self) -> None:
        """The gateway refused the request before the upstream: the key can be used again."""
        await self.conclude(None)
