"""Authentication: a gateway key (fixed in the config file or stored in Redis) → a Principal.

Only SHA-256 digests are compared or stored. Keys from Redis are cached in-process for
``auth.key_cache_seconds`` (< 5 s), so a revoked key is refused by every replica
within 5 s while the hot path costs no Redis round trip.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from gateway.auth.records import StoredKey
from gateway.config import Limits, Settings, StaticKey, key_digest
from gateway.errors import InvalidApiKey

_CACHE_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's user, team, plan, merged limits and allowed models."""

    key_id: str
    user: str
    team: str | None
    plan: str
    limits: Limits
    models: frozenset[str] | None  # None: every enabled model


class KeyLookup(Protocol):
    async def lookup(self, digest: str) -> StoredKey | None: ...


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def token_matches(given: str | None, token: str) -> bool:
    """Whether ``given`` is the operator token ``token`` (admin, metrics), compared in constant time."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


class Authenticator:
    """Resolves ``Authorization: Bearer <key>`` to a Principal, or raises InvalidApiKey."""

    def __init__(self, settings: Settings, store: KeyLookup | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._store = store
        self._clock = clock
        self._static = {k.sha256: self._principal_of_static(k) for k in settings.keys}
        self._cache: dict[str, tuple[Principal | None, float]] = {}

    def _principal_of_static(self, key: StaticKey) -> Principal:
        return self._principal(f"cfg-{key.sha256[:12]}", key.user, key.team, key.plan, key.limits, key.models)

    def _principal(self, key_id: str, user: str, team: str | None, plan_name: str, overrides: Any,
                   key_models: tuple[str, ...] | None) -> Principal:
        plan = self._settings.plan(plan_name)
        allowed: frozenset[str] | None = None
        for allow in (plan.models, key_models):
            if allow is not None:
                allowed = frozenset(allow) if allowed is None else allowed & frozenset(allow)
        return Principal(key_id=key_id, user=user, team=team, plan=plan_name,
                         limits=plan.limits.merged(overrides), models=allowed)

    async def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        if token is None:
            raise InvalidApiKey()
        digest = key_digest(token)
        principal = self._static.get(digest)
        if principal is None and self._store is not None:
            principal = await self._lookup_cached(digest)
        if principal is None:
            raise InvalidApiKey()
        return principal

    async def _lookup_cached(self, digest: str) -> Principal | None:
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        assert self._store is not None
        stored = await self._store.lookup(digest)
        principal = None
        if stored is not None and stored.usable(datetime.now(UTC)):
            principal = self._principal(stored.id, stored.user, stored.team, stored.plan, stored.limits,
                                        stored.models)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[digest] = (principal, now + self._settings.auth.key_cache_seconds)
        return principal
