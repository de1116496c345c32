"""Per-user rate limits and quotas in Redis: one script before the upstream call, one after.

``Limiter.admit`` runs ``lua/admit.lua`` (one EVALSHA). It checks, in this order,
max_concurrent_requests, requests_per_minute, images_per_minute, then the quotas
tokens_per_day, tokens_per_month, images_per_day, images_per_month, usd_per_month; the
first that fails is the one reported, and a refused request writes nothing. An admitted
request is logged in the per-minute windows, holds a lease on a concurrency slot and
reserves its estimate (tokens, images, usd) in the day and month usage hashes.

``Limiter.settle`` runs ``lua/settle.lua`` (one EVALSHA) once the upstream answered: it
frees the slot and the reservation, adds the reported usage to the admission's day and
month, and appends a ledger record. It is idempotent on the request id. ``Limiter.renew``
(``lua/renew.lua``) pushes back the lease of a request still running (a long stream).

Redis layout, every key under the user's hash tag (one Cluster slot; ``RedisKeys``):

==================  ======  ===========================================  ======================
key                 type    content                                      TTL
==================  ======  ===========================================  ======================
``rpm``             zset    request_id -> admission ms                   window (60 s)
``ipm``             zset    ``request_id:i`` (n per request) -> ms       window (60 s)
``inflight``        zset    request_id -> lease deadline ms              lease
``res``             hash    request_id -> reserved amounts, period keys  lease
``d:YYYY-MM-DD``    hash    usage of a UTC day (fields below)            ``day_ttl_s`` (400 d)
``m:YYYY-MM``       hash    usage of a UTC month                         ``month_ttl_s`` (800 d)
``settled:<id>``    string  settle dedupe marker                         ``settled_ttl_s`` (3 d)
``ledger``          stream  one record per finished request              MAXLEN ~ ledger_maxlen
==================  ======  ===========================================  ======================

Usage hash fields: settled ``requests images input_tokens input_text_tokens
input_image_tokens output_tokens total_tokens usd_micros`` and outstanding reservations
``res_tokens res_images res_usd_micros``. Money is integer micro-dollars so sums are exact.
Every admitted request is logged, leased and reserved, whether or not the key it came
through has limits: a user's limits count all of the user's requests, whichever key (and
key overrides) they used. A lease that passes its deadline without a settle (the worker
died) is expired by the next admit of that user, or by a worker's background sweep
(``Limiter.sweep``, ``lua/sweep.lua``) if the user sends nothing more: its slot is freed,
its reservation is kept as its usage (the upstream may have billed it), and its unsettled
ledger record (``settled: false``, given at admission) is written; a settle that comes later
is a no-op (settled marker). Usage counts in the UTC day and
month the request was admitted in. A retried admit of the same request id (its first reply
was lost) is answered as admitted without counting twice.

With ``redis.asyncio.RedisCluster``, ``await client.initialize()`` before serving: redis-py
8.1 routes the first commands of an uninitialised client blindly, and the MOVED re-mapping
that follows breaks connections that are still opening under a burst.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import orjson
from redis.asyncio import Redis, RedisCluster

from gateway.config import Limits
from gateway.errors import QuotaExceeded, RateLimited
from gateway.redisdb.batcher import Batcher
from gateway.redisdb.keys import RedisKeys

WINDOW_MS = 60_000
ADMIT_MODES = ("all", "reserve", "pace")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_QUOTA_UNITS = {"tokens_per_day": "tokens", "tokens_per_month": "tokens", "images_per_day": "images",
                "images_per_month": "images", "usd_per_month": "USD"}


@dataclass(frozen=True, slots=True)
class Periods:
    """The UTC day and month of an instant, and when each ends (ms since the epoch)."""

    day: str  # YYYY-MM-DD
    month: str  # YYYY-MM
    day_end_ms: int
    month_end_ms: int


def utc_periods(now_ms: int) -> Periods:
    """The UTC calendar day and month containing ``now_ms``."""
    return _day_periods(now_ms // 86_400_000)


@functools.lru_cache(maxsize=64)
def _day_periods(day_index: int) -> Periods:
    """Periods of the UTC day ``day_index`` (days since the epoch): computed once per day, not per request."""
    now = _EPOCH + timedelta(days=day_index)
    day_start = datetime(now.year, now.month, now.day, tzinfo=UTC)
    next_month = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    return Periods(day=f"{now:%Y-%m-%d}", month=f"{now:%Y-%m}",
                   day_end_ms=_ms(day_start + timedelta(days=1)), month_end_ms=_ms(next_month))


def _ms(dt: datetime) -> int:
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def go_duration(ms: int) -> str:
    """A duration in Go's ``time.Duration.String`` format: ``500ms``, ``1.5s``, ``1m0s``, ``1h2m3s``."""
    if ms == 0:
        return "0s"
    sign, ms = ("-" if ms < 0 else ""), abs(ms)
    if ms < 1000:
        return f"{sign}{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    sec = f"{seconds}.{millis:03d}".rstrip("0") if millis else str(seconds)
    if hours:
        return f"{sign}{hours}h{minutes}m{sec}s"
    if minutes:
        return f"{sign}{minutes}m{sec}s"
    return f"{sign}{sec}s"


def usd_micros(usd: float) -> int:
    """Dollars as integer micro-dollars, the unit every sum in Redis uses."""
    return round(usd * 1_000_000)


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted request: what settle needs, and the x-ratelimit-* response headers."""

    request_id: str
    user: str
    now_ms: int
    lease_deadline_ms: int
    day: str
    month: str
    reserved_tokens: int
    reserved_images: int
    reserved_usd_micros: int
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class SettledUsage:
    """What a finished request used, as the upstream reported it (all zero for a failed call)."""

    input_text_tokens: int = 0
    input_image_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    images: int = 0
    usd_micros: int = 0


NO_USAGE = SettledUsage()

RedisClient = Redis | RedisCluster


def _script(name: str) -> str:
    """A Lua script with the shared functions of lib.lua in front of it."""
    lua = resources.files("gateway.limits").joinpath("lua")
    return lua.joinpath("lib.lua").read_text(encoding="utf-8") + lua.joinpath(name).read_text(encoding="utf-8")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _limit_arg(value: int | None) -> int:
    return -1 if value is None else value


class Limiter:
    """Admits and settles requests against a user's limits, exactly, in one round trip each."""

    def __init__(self, client: RedisClient, keys: RedisKeys, *, lease_ms: int,
                 ledger_maxlen: int = 10_000_000, day_ttl_s: int = 400 * 86_400,
                 month_ttl_s: int = 800 * 86_400, settled_ttl_s: int = 3 * 86_400,
                 batcher: Batcher | None = None) -> None:
        self.keys = keys
        # Every script call goes through the batcher: one pipeline per loop tick, not one round trip each.
        self.batcher = batcher or Batcher(client)
        self._admit_keys = functools.lru_cache(maxsize=8192)(self._build_admit_keys)
        self._client = client
        self.lease_ms = lease_ms
        self.ledger_maxlen = ledger_maxlen
        self.day_ttl_s = day_ttl_s
        self.month_ttl_s = month_ttl_s
        self.settled_ttl_s = settled_ttl_s
        # Script objects run EVALSHA and reload on NoScriptError (a restarted, empty Redis).
        self._admit = client.register_script(_script("admit.lua"))
        self._settle = client.register_script(_script("settle.lua"))
        self._cancel = client.register_script(_script("cancel.lua"))
        self._renew = client.register_script(_script("renew.lua"))
        self._sweep = client.register_script(_script("sweep.lua"))

    def _build_admit_keys(self, user: str, day: str, month: str) -> tuple[str, ...]:
        k = self.keys
        return (k.requests_window(user), k.images_window(user), k.inflight(user), k.reservations(user),
                k.day_usage(user, day), k.month_usage(user, month), k.ledger(user))

    async def admit(self, *, user: str, limits: Limits, request_id: str, n: int, est_tokens: int,
                    est_usd_micros: int, now_ms: int, queue_deadline: float | None = None,
                    mode: str = "all", record: Mapping[str, str] | None = None,
                    lease_from_ms: int | None = None) -> Admission:
        """Admit a request or raise ``RateLimited`` / ``QuotaExceeded``; Redis errors and ``Shed`` propagate.

        ``queue_deadline`` (monotonic seconds): shed rather than wait for Redis past it (see ``Batcher``).
        ``mode`` splits a job's admission in two (admit.lua): ``reserve`` checks and reserves the
        quotas at submission, ``pace`` checks the per-minute and concurrency limits when it starts.
        ``record`` is the ledger record written if the lease expires without a settle.
        ``now_ms`` is the request's arrival (its windows and periods); the lease runs from ``lease_from_ms``
        (the moment of admission, when later: a request that waited for its Idempotency-Key), else from it.
        """
        if mode not in ADMIT_MODES:
            raise ValueError(f"mode must be one of {ADMIT_MODES}, got {mode!r}")
        _check_counts(n=n, est_tokens=est_tokens, est_usd_micros=est_usd_micros)
        periods = utc_periods(now_ms)
        deadline = max(now_ms, lease_from_ms or 0) + self.lease_ms
        keys = self._admit_keys(user, periods.day, periods.month)
        args: list[Any] = [request_id, now_ms, deadline, n, est_tokens, est_usd_micros,
                           *_plan_args(limits), self.day_ttl_s, self.month_ttl_s, WINDOW_MS, mode,
                           _record_json(record), *self._expiry_args(user)]
        reply = await self.batcher.run(self._admit, keys, args, deadline=queue_deadline)
        if int(reply[0]) == 0:
            raise _refusal(_text(reply[1]), int(reply[2]), limits, periods)
        reqs, first_req, imgs, first_img, day_tokens, month_tokens = (int(x) for x in reply[1:7])
        headers: dict[str, str] = {}
        # Per-minute reset: when the oldest entry leaves the window (one more slot frees).
        reset_req, reset_img = first_req + WINDOW_MS - now_ms, first_img + WINDOW_MS - now_ms
        if limits.requests_per_minute is not None:
            _window_headers(headers, "requests", limits.requests_per_minute, reqs, reset_req)
        if limits.images_per_minute is not None:
            _window_headers(headers, "images", limits.images_per_minute, imgs, reset_img)
        if limits.tokens_per_day is not None:
            _window_headers(headers, "tokens", limits.tokens_per_day, day_tokens, periods.day_end_ms - now_ms)
        elif limits.tokens_per_month is not None:
            _window_headers(headers, "tokens", limits.tokens_per_month, month_tokens,
                            periods.month_end_ms - now_ms)
        return Admission(request_id=request_id, user=user, now_ms=now_ms, lease_deadline_ms=deadline,
                         day=periods.day, month=periods.month, reserved_tokens=est_tokens, reserved_images=n,
                         reserved_usd_micros=est_usd_micros, headers=headers)

    async def settle(self, admission: Admission, usage: SettledUsage,
                     record: Mapping[str, str] | None = None) -> bool:
        """Free the slot and reservation and add ``usage``; False if this request was already settled."""
        # Checked here: a script error half-way would leave the request marked settled, its usage lost.
        _check_counts(**{f: getattr(usage, f) for f in SettledUsage.__slots__})
        k, user, rid = self.keys, admission.user, admission.request_id
        keys = [k.inflight(user), k.reservations(user), k.day_usage(user, admission.day),
                k.month_usage(user, admission.month), k.settled(user, rid), k.ledger(user)]
        args: list[Any] = [rid, usage.input_text_tokens, usage.input_image_tokens, usage.output_tokens,
                           usage.total_tokens, usage.images, usage.usd_micros,
                           self.day_ttl_s, self.month_ttl_s, self.settled_ttl_s, self.ledger_maxlen,
                           _record_json(record)]
        return bool(int(await self.batcher.run(self._settle, keys, args)))

    async def cancel(self, *, user: str, request_id: str, n: int, now_ms: int) -> bool:
        """Undo an admission the caller never learnt of (Redis timed out after admit ran); True if it had run."""
        k = self.keys
        periods = utc_periods(now_ms)
        keys = [k.requests_window(user), k.images_window(user), k.inflight(user), k.reservations(user),
                k.day_usage(user, periods.day), k.month_usage(user, periods.month), k.settled(user, request_id)]
        return bool(int(await self.batcher.run(self._cancel, keys, [request_id, n, self.settled_ttl_s])))

    async def drop_lease(self, user: str, request_id: str) -> None:
        """Free the concurrency slot of a paced job found cancelled (its reservation is already gone)."""
        await self._client.zrem(self.keys.inflight(user), request_id)

    async def renew(self, admission: Admission, now_ms: int) -> bool:
        """Push a running request's lease to ``now_ms`` + the lease; False if it is already gone."""
        keys = [self.keys.inflight(admission.user)]
        return bool(int(await self.batcher.run(self._renew, keys, [admission.request_id, now_ms + self.lease_ms])))

    async def sweep(self, user: str, now_ms: int, most: int = 256) -> int:
        """Expire the user's leases past their deadline (worker died): unsettled records written."""
        k = self.keys
        keys = [k.inflight(user), k.reservations(user), k.ledger(user)]
        return int(await self.batcher.run(self._sweep, keys, [now_ms, *self._expiry_args(user), most]))

    def _expiry_args(self, user: str) -> list[Any]:
        """What expiring a lease needs: the settled-marker key prefix, its TTL, the ledger's MAXLEN."""
        return [self.keys.settled(user, ""), self.settled_ttl_s, self.ledger_maxlen]

    async def release(self, admission: Admission, record: Mapping[str, str] | None = None) -> bool:
        """Settle a failed call: it costs nothing, but still counts as a finished request."""
        return await self.settle(admission, NO_USAGE, record)


COUNT_MAX = 2**53 - 1  # the scripts refuse more (exact in Lua's doubles); see settle.lua


@functools.lru_cache(maxsize=1024)
def _plan_args(limits: Limits) -> tuple[int, ...]:
    """admit.lua's limit arguments (-1: unlimited), computed once per distinct set of limits."""
    usd_limit = None if limits.usd_per_month is None else usd_micros(limits.usd_per_month)
    return tuple(_limit_arg(v) for v in (limits.requests_per_minute, limits.images_per_minute,
                                         limits.max_concurrent_requests, limits.tokens_per_day,
                                         limits.tokens_per_month, limits.images_per_day,
                                         limits.images_per_month, usd_limit))


def _record_json(record: Mapping[str, str] | None) -> bytes:
    """A ledger record as the JSON array [field, value, ...] that Lua's cjson hands to XADD."""
    return orjson.dumps([x for pair in record.items() for x in pair]) if record else b""


def _check_counts(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= COUNT_MAX:
            raise ValueError(f"{name} must be an integer from 0 to {COUNT_MAX}, got {value!r}")


def _window_headers(headers: dict[str, str], kind: str, limit: int, used: int, reset_ms: int) -> None:
    headers[f"x-ratelimit-limit-{kind}"] = str(limit)
    headers[f"x-ratelimit-remaining-{kind}"] = str(max(limit - used, 0))
    headers[f"x-ratelimit-reset-{kind}"] = go_duration(max(reset_ms, 0))


def _refusal(name: str, retry_ms: int, limits: Limits, periods: Periods) -> RateLimited | QuotaExceeded:
    limit = getattr(limits, name)
    if name in _QUOTA_UNITS:
        end_ms = periods.day_end_ms if name.endswith("_day") else periods.month_end_ms
        resets = (_EPOCH + timedelta(milliseconds=end_ms)).strftime("%Y-%m-%dT%H:%M:%SZ")
        amount = f"{limit:.2f}".rstrip("0").rstrip(".") if name == "usd_per_month" else str(limit)
        return QuotaExceeded(f"You exceeded your {name} quota ({amount} {_QUOTA_UNITS[name]}); "
                             f"it resets at {resets}.", limit_name=name)
    # Requests are stamped when they arrive, so one admitted just after an earlier arrival can sit a few ms
    # "in the future" of it: no per-minute limit ever needs a wait beyond its window.
    retry_ms = min(max(retry_ms, 1), WINDOW_MS)
    if name == "max_concurrent_requests":
        what = f"{limit} requests in flight at once"
    else:
        what = f"{limit} {name.split('_')[0]} per minute"
    message = f"Rate limit reached for {name} ({what}). Please try again in {go_duration(retry_ms)}."
    return RateLimited(message, limit_name=name,
                       headers={"retry-after": str(max(math.ceil(retry_ms / 1000), 1)),
                                "retry-after-ms": str(retry_ms)})
