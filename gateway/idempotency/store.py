"""Idempotency-Key records in Redis: claim, complete and release, one script round trip each.

One hash per (user, key) under the user's hash tag (``RedisKeys.idempotency``), so it works on
Redis Cluster and across workers, replicas and restarts. The scripts' contracts are in ``lua/``.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from gateway.errors import StorageUnavailable
from gateway.idempotency.answers import Answer, decode_answer
from gateway.idempotency.bodies import AnswerBodies, InlineBodies
from gateway.redisdb.keys import RedisKeys


class ClaimState(enum.Enum):
    CLAIMED = "claimed"  # the caller runs the request
    MISMATCH = "mismatch"  # the key was first used with another request
    RUNNING = "running"  # another request holds the key
    DONE = "done"  # the stored answer is in ``Claim.answer``


@dataclass(frozen=True, slots=True)
class Claim:
    state: ClaimState
    lease_deadline_ms: int = 0  # RUNNING: when the holder's claim may be taken over
    answer: Answer | None = None  # DONE


def _script(name: str) -> str:
    return resources.files("gateway.idempotency").joinpath("lua", name).read_text(encoding="utf-8")


def key_digest(key: str) -> str:
    """The SHA-256 under which a client's Idempotency-Key is stored (bounded length, any characters)."""
    return hashlib.sha256(key.encode()).hexdigest()


class IdempotencyStore:
    """Claims and stored answers of Idempotency-Keys, kept ``ttl_seconds``."""

    def __init__(self, client: Any, keys: RedisKeys, *, ttl_seconds: int, bodies: AnswerBodies | None = None) -> None:
        self._keys = keys
        self._ttl_ms = ttl_seconds * 1000
        self._bodies = bodies or InlineBodies()
        self._claim = client.register_script(_script("claim.lua"))
        self._complete = client.register_script(_script("complete.lua"))
        self._release = client.register_script(_script("release.lua"))

    def _record(self, user: str, key: str) -> str:
        return self._keys.idempotency(user, key_digest(key))

    async def claim(self, user: str, key: str, fingerprint: str, token: str, *, now_ms: int,
                    lease_ms: int) -> Claim:
        """Claim the key for ``token``, or report who holds it or what it answered."""
        reply = await self._claim(keys=[self._record(user, key)],
                                  args=[fingerprint, token, now_ms, now_ms + lease_ms, self._ttl_ms])
        state = ClaimState(_text(reply[0]))
        if state is ClaimState.RUNNING:
            return Claim(state, lease_deadline_ms=int(reply[1]))
        if state is ClaimState.DONE:
            status, headers, body, blob = reply[1:5]
            if blob:
                try:
                    body = await self._bodies.get(_text(blob))
                except LookupError as exc:
                    raise StorageUnavailable("The stored answer of this Idempotency-Key is no longer in the image "
                                             "store.") from exc
            return Claim(state, answer=decode_answer(status, headers, body))
        return Claim(state)

    async def complete(self, user: str, key: str, fingerprint: str, answer: Answer) -> bool:
        """Store the key's answer; False if one was already stored (the first answer stays)."""
        record = self._record(user, key)
        blob = await self._bodies.put(f"idempotency/{record}", answer.body)
        body = b"" if blob else answer.body
        stored = await self._complete(keys=[record], args=[fingerprint, answer.status, answer.encoded_headers(),
                                                           body, blob or "", self._ttl_ms])
        return bool(stored)

    async def release(self, user: str, key: str, token: str) -> bool:
        """Give the key back (the gateway refused the request itself); False if ``token`` no longer holds it."""
        return bool(await self._release(keys=[self._record(user, key)], args=[token]))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
