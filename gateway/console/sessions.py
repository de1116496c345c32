"""Console sessions and one-time sign-in codes, kept in Redis so every replica knows them.

The cookie holds a random token; Redis holds only its SHA-256, with the session's CSRF
token, for ``SESSION_SECONDS``. A sign-in code (for ``gateway demo``'s link) is single use
and short lived, so the admin token itself never appears in a URL.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from gateway.redisdb.keys import RedisKeys

SESSION_SECONDS = 12 * 3600
CODE_SECONDS = 600


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Session:
    token: str
    csrf: str


class ConsoleSessions:
    """Create, find and end console sessions; issue and redeem one-time sign-in codes."""

    def __init__(self, client: Any, keys: RedisKeys) -> None:
        self._redis = client
        self._keys = keys

    async def create(self) -> Session:
        session = Session(token=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32))
        await self._redis.set(self._keys.console_session(_digest(session.token)), session.csrf, ex=SESSION_SECONDS)
        return session

    async def find(self, token: str | None) -> Session | None:
        if not token or len(token) > 128:
            return None
        csrf = await self._redis.get(self._keys.console_session(_digest(token)))
        return None if csrf is None else Session(token=token, csrf=csrf.decode())

    async def end(self, token: str) -> None:
        await self._redis.delete(self._keys.console_session(_digest(token)))

    async def issue_code(self) -> str:
        code = secrets.token_urlsafe(24)
        await self._redis.set(self._keys.console_code(_digest(code)), b"1", ex=CODE_SECONDS)
        return code

    async def redeem(self, code: str) -> bool:
        """True once for a live code (GETDEL: two replicas cannot both redeem it)."""
        if not code or len(code) > 128:
            return False
        return await self._redis.getdel(self._keys.console_code(_digest(code))) is not None
