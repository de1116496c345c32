"""Brute-force guard: a client address that keeps failing authentication is refused for a while.

After ``auth.failed_attempts_per_minute`` failed authentications (any 401: missing, unknown,
revoked or expired gateway key, or a wrong admin token) within 60 s, the address gets
429 ``rate_limit_exceeded`` with ``retry-after`` for ``auth.block_seconds``, on every
route that authenticates and whatever key it presents: a right guess from a blocked
address must look exactly like a wrong one. ``0`` for either setting turns the guard off.

Cost on the hot path: none for a good key. Only a failure runs ``lua/auth_fail.lua`` (one
EVALSHA, counted in Redis so the limit holds across replicas and workers). Each process
keeps an in-memory view of the addresses it has seen blocked, filled from the script's
answer; requests from those addresses are refused without touching Redis. Another replica
learns of a block at the first failure it sees from that address, so a blocked attacker
gets at most one unguarded attempt per replica and worker per block period.

The address is the ASGI client host. ``X-Forwarded-For`` is not read here: uvicorn
rewrites the client host from it only when the peer is a trusted proxy
(``FORWARDED_ALLOW_IPS``, default ``127.0.0.1,::1``), so behind a load balancer set that
variable to the balancer's addresses, or every client shares one address.

A Redis error while counting is counted in ``gateway_redis_errors_total{op="auth_guard"}``
and the client gets its 401 as usual: the guard never fails a request of its own accord.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar

from starlette.requests import Request

from gateway.config import AuthSettings
from gateway.errors import GatewayError, RateLimited
from gateway.metering.metrics import Metrics
from gateway.redisdb.client import REDIS_ERRORS
from gateway.redisdb.keys import RedisKeys

T = TypeVar("T")
WINDOW_MS = 60_000
_LOCAL_MAX = 100_000
_SAFE_ADDRESS = re.compile(r"^[0-9A-Za-z.:%_-]{1,64}$")


def client_address(request: Request) -> str:
    """The ASGI client host, made safe for a Redis key (it goes inside a hash tag)."""
    host = request.client.host if request.client else ""
    if not host:
        return "unknown"
    if _SAFE_ADDRESS.match(host):
        return host
    return "h-" + hashlib.sha256(host.encode()).hexdigest()[:24]


def _refusal(ms_left: float) -> RateLimited:
    ms = max(1, math.ceil(ms_left))
    return RateLimited("Too many failed authentication attempts from your address. Try again later.",
                       limit_name="auth_failures",
                       headers={"retry-after": str(max(1, math.ceil(ms / 1000))), "retry-after-ms": str(ms)})


class AuthGuard:
    """Counts failed authentications per client address in Redis and refuses blocked addresses."""

    def __init__(self, client: Any, keys: RedisKeys, settings: AuthSettings, metrics: Metrics, *,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._keys = keys
        self._allowed = settings.failed_attempts_per_minute
        self._block_ms = settings.block_seconds * 1000
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._blocked: dict[str, float] = {}  # address -> monotonic deadline
        self.enabled = self._allowed > 0 and self._block_ms > 0
        script = resources.files("gateway.auth").joinpath("lua", "auth_fail.lua").read_text(encoding="utf-8")
        # A Script runs EVALSHA and reloads itself on NoScriptError (a restarted, empty Redis).
        self._script = client.register_script(script) if client is not None and self.enabled else None

    def blocked_ms(self, address: str) -> float | None:
        """Milliseconds this process still refuses ``address`` for, from its local view (no Redis)."""
        deadline = self._blocked.get(address)
        if deadline is None:
            return None
        left = (deadline - self._monotonic()) * 1000
        if left <= 0:
            self._blocked.pop(address, None)
            return None
        return left

    def _remember_block(self, address: str, ms: float) -> None:
        now = self._monotonic()
        if len(self._blocked) >= _LOCAL_MAX:
            self._blocked = {a: d for a, d in self._blocked.items() if d > now}
            if len(self._blocked) >= _LOCAL_MAX:
                self._blocked.pop(next(iter(self._blocked)))
        self._blocked[address] = now + ms / 1000

    async def guard(self, address: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` (an authentication) unless ``address`` is blocked; count it if it answers 401."""
        if not self.enabled:
            return await attempt()
        left = self.blocked_ms(address)
        if left is not None:
            self._metrics.auth_failures.labels("blocked").inc()
            raise _refusal(left)
        try:
            return await attempt()
        except GatewayError as err:
            if err.status != 401:
                raise
            refusal = await self.failed(address)
            if refusal is not None:
                raise refusal from None
            raise

    async def failed(self, address: str) -> RateLimited | None:
        """Count a failed authentication; the refusal to answer instead if the address was already blocked."""
        if self._script is None:
            self._metrics.auth_failures.labels("failed").inc()
            return None
        k = self._keys
        try:
            status, ms = await self._script(
                keys=[k.auth_failures(address), k.auth_block(address)],
                args=[int(self._clock() * 1000), uuid.uuid4().hex, self._allowed, WINDOW_MS, self._block_ms])
        except REDIS_ERRORS:
            self._metrics.redis_errors.labels("auth_guard").inc()
            self._metrics.auth_failures.labels("failed").inc()
            return None
        if int(status) == 1:
            self._remember_block(address, int(ms))
            self._metrics.auth_failures.labels("blocked").inc()
            return _refusal(int(ms))
        if int(status) == 2:
            self._remember_block(address, int(ms))
        self._metrics.auth_failures.labels("failed").inc()
        return None

    async def authenticate(self, request: Request, attempt: Callable[[], Awaitable[T]]) -> T:
        """``guard`` for the request's client address."""
        return await self.guard(client_address(request), attempt)
