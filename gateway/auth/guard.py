"""Brute-force guard: failing credentials from one client address are counted, then refused.

The credential is always checked first: a valid key or admin token is served whatever its
address did before (so one client behind a NAT cannot lock out its neighbours or the
admins). Only a failed authentication (any 401: missing, unknown, revoked or expired key,
or a wrong admin token) is counted, and while the address is blocked it is answered 429
``rate_limit_exceeded`` with ``retry-after`` instead of 401.

The rule (``lua/auth_fail.lua``): an address is blocked for ``auth.block_seconds`` from any
failure that makes ``auth.failed_attempts_per_minute`` failures within 60 s. Failures are
counted while blocked as well, so an address that keeps failing faster than the limit stays
blocked until ``block_seconds`` after it slows down, and a block never resets the count.
API-key failures and admin-token failures are counted apart (their own Redis keys), so
neither can block the other. ``0`` for either setting turns the guard off.

Cost: none for a good credential; a failure runs one EVALSHA (counted in Redis, so the limit
holds across replicas and workers).

The address is the ASGI client host, IPv4 per address and IPv6 per /64 (one host usually
holds a whole /64). ``X-Forwarded-For`` is not read here: uvicorn rewrites the client host
from it only when the peer is in ``FORWARDED_ALLOW_IPS`` (default ``127.0.0.1``). Set that to
the proxies' addresses, never ``*``: with ``*`` any client can name any address, to frame a
neighbour or to rotate its own out of the count.

A Redis error while counting is counted in ``gateway_redis_errors_total{op="auth_guard"}``
and the client gets its 401 as usual: the guard never fails a request of its own accord.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Literal, TypeVar

from starlette.requests import Request

from gateway.config import AuthSettings
from gateway.errors import GatewayError, RateLimited
from gateway.metering.metrics import Metrics
from gateway.redisdb.client import REDIS_ERRORS
from gateway.redisdb.keys import RedisKeys

T = TypeVar("T")
Kind = Literal["key", "admin"]
WINDOW_MS = 60_000
_SAFE_ADDRESS = re.compile(r"[0-9A-Za-z.:%_-]{1,64}")


def address_of(host: str) -> str:
    """The guard's unit for a client host: the IPv4 address, the IPv6 /64, else a Redis-key-safe name."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        if not host:
            return "unknown"
        return host if _SAFE_ADDRESS.fullmatch(host) else "h-" + hashlib.sha256(host.encode()).hexdigest()[:24]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def client_address(request: Request) -> str:
    """``address_of`` the request's ASGI client host."""
    return address_of(request.client.host if request.client else "")


def _refusal(ms_left: float) -> RateLimited:
    ms = max(1, math.ceil(ms_left))
    return RateLimited("Too many failed authentication attempts from your address. Try again later.",
                       limit_name="auth_failures",
                       headers={"retry-after": str(max(1, math.ceil(ms / 1000))), "retry-after-ms": str(ms)})


class AuthGuard:
    """Counts failed authentications per client address in Redis; refuses failures of blocked addresses."""

    def __init__(self, client: Any, keys: RedisKeys, settings: AuthSettings, metrics: Metrics, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._keys = keys
        self._allowed = settings.failed_attempts_per_minute
        self._block_ms = settings.block_seconds * 1000
        self._metrics = metrics
        self._clock = clock
        self.enabled = self._allowed > 0 and self._block_ms > 0
        script = resources.files("gateway.auth").joinpath("lua", "auth_fail.lua").read_text(encoding="utf-8")
        # A Script runs EVALSHA and reloads itself on NoScriptError (a restarted, empty Redis).
        self._script = client.register_script(script) if client is not None and self.enabled else None

    async def guard(self, address: str | Callable[[], str], attempt: Callable[[], Awaitable[T]],
                    kind: Kind = "key") -> T:
        """Run ``attempt`` (an authentication); if it answers 401, count it, and refuse it if blocked.

        ``address`` may be a function: worked out only for a failure (a good key costs nothing).
        """
        try:
            return await attempt()
        except GatewayError as err:
            if err.status != 401 or not self.enabled:
                raise
            refusal = await self.failed(address if isinstance(address, str) else address(), kind)
            if refusal is not None:
                raise refusal from None
            raise

    async def failed(self, address: str, kind: Kind = "key") -> RateLimited | None:
        """Count a failed authentication; the 429 to answer instead of the 401 if the address is blocked."""
        if self._script is None:
            self._metrics.auth_failures.labels("failed").inc()
            return None
        k = self._keys
        keys = ([k.admin_auth_failures(address), k.admin_auth_block(address)] if kind == "admin"
                else [k.auth_failures(address), k.auth_block(address)])
        try:
            status, ms = await self._script(
                keys=keys, args=[int(self._clock() * 1000), uuid.uuid4().hex, self._allowed, WINDOW_MS,
                                 self._block_ms])
        except REDIS_ERRORS:
            self._metrics.redis_errors.labels("auth_guard").inc()
            self._metrics.auth_failures.labels("failed").inc()
            return None
        if int(status) == 1:
            self._metrics.auth_failures.labels("blocked").inc()
            return _refusal(int(ms))
        self._metrics.auth_failures.labels("failed").inc()
        return None

    async def authenticate(self, request: Request, attempt: Callable[[], Awaitable[T]], kind: Kind = "key") -> T:
        """``guard`` for the request's client address."""
        return await self.guard(lambda: client_address(request), attempt, kind)
