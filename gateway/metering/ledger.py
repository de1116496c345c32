"""The usage ledger: one record per finished request, and the code that reads it back.

A record is written by ``settle.lua`` into the user's Redis Stream (``RedisKeys.ledger``)
in the same script that settles the quota, so the aggregates and the ledger never
disagree. A request whose lease expired without a settle (its worker died) gets the
record ``unsettled_record`` built at admission, written by ``admit.lua`` or ``sweep.lua``
when they find the lease expired: ``settled: false``, the reservation's estimate as usage.
Stream values are strings; ``decode_record`` turns them back into typed values.

Reading (admin API and ``gateway usage`` share it): ``period_totals`` reads one day or
month aggregate hash; ``iter_records`` streams the records whose ``time`` (the admission
instant) falls in ``[from, to)``, user by user in name order, each user's records in the
order they were settled, reading XRANGE pages of ``page`` entries so memory stays flat.

A stream entry's id is the settle instant (Redis clock), never earlier than the record's
``time`` bar clock skew, but possibly much later (a long stream, a settlement replayed
from the spool after a restart). So a user's stream is read from ``from - SKEW_MS`` to its
end and filtered on ``time``: the cost of an export grows with the records settled since
``from``, and no late record is missed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from gateway.limits.limiter import SettledUsage
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.request import GENERATIONS, ROUTE_NAMES
from gateway.redisdb.keys import RedisKeys

# The billing schema, in CSV column order. Never a key, a prompt or a secret.
FIELDS = ("request_id", "time", "user", "team", "key_id", "route", "model", "size", "quality", "n", "stream",
          "status", "input_tokens", "input_text_tokens", "input_image_tokens", "output_tokens",
          "total_tokens", "images", "usd", "latency_ms", "incomplete", "client_gone", "settled")
_INTS = frozenset({"n", "status", "input_tokens", "input_text_tokens", "input_image_tokens", "output_tokens",
                   "total_tokens", "images", "latency_ms"})
_BOOLS = frozenset({"stream", "incomplete", "client_gone", "settled"})
_TRUE_IF_ABSENT = frozenset({"settled"})  # records written before the field existed were all settled
_OPTIONAL = frozenset({"team", "size", "quality"})  # "" in the stream and CSV, null in JSONL
TOTAL_FIELDS = ("requests", "images", "input_tokens", "input_text_tokens", "input_image_tokens", "output_tokens",
                "total_tokens")
# Records written before edits existed carry no route: they were all generations.
_DEFAULTS = {"route": ROUTE_NAMES[GENERATIONS]}
SKEW_MS = 5 * 60_000  # tolerated clock difference between gateway hosts and Redis
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_MONTH_RE = re.compile(r"^\d{4}-\d{2}$")


def usd_text(micros: int) -> str:
    """Integer micro-dollars as an exact decimal string (``40000`` -> ``"0.040000"``)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


def iso_ms(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC with milliseconds (``2026-11-24T12:00:00.123Z``).

    Twice per request (the record kept at admission, the one settled): the date is computed once a day.
    """
    day, in_day = divmod(ms, 86_400_000)
    seconds, millis = divmod(in_day, 1000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    return f"{_iso_day(day)}T{hour:02d}:{minute:02d}:{second:02d}.{millis:03d}Z"


@functools.lru_cache(maxsize=64)
def _iso_day(day_index: int) -> str:
    return f"{_EPOCH + timedelta(days=day_index):%Y-%m-%d}"


def parse_iso(text: str) -> int:
    """ISO 8601 (``Z``, an offset, or naive meaning UTC) as ms since the epoch; ValueError if not one."""
    dt = datetime.fromisoformat(text.strip())
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def build_record(exchange: Exchange, usage: SettledUsage, latency_ms: int) -> dict[str, str]:
    """The ledger record of a finished request, as the stream stores it (all strings)."""
    return _record(exchange, usage, latency_ms, exchange.status, exchange.incomplete, exchange.client_gone, True)


def unsettled_record(exchange: Exchange, tokens: int, usd_micros: int) -> dict[str, str]:
    """The record written if the request's lease expires without a settle (its worker died).

    Its usage is the reservation's estimate (total tokens, images = n, usd), which the quota keeps:
    the upstream may have generated and billed it. ``status`` 0: no answer is known.
    """
    usage = SettledUsage(total_tokens=tokens, images=exchange.request.n, usd_micros=usd_micros)
    return _record(exchange, usage, 0, 0, True, False, False)


_BOOL_TEXT = ("false", "true")


def _record(exchange: Exchange, usage: SettledUsage, latency_ms: int, status: int, incomplete: bool,
            client_gone: bool, settled: bool) -> dict[str, str]:
    """A record in FIELDS order, every value as its text (built directly: twice per request)."""
    p, req = exchange.principal, exchange.request
    return {
        "request_id": exchange.request_id, "time": iso_ms(exchange.started_ms), "user": p.user,
        "team": p.team or "", "key_id": p.key_id, "route": ROUTE_NAMES.get(exchange.route, exchange.route),
        "model": req.model, "size": req.size or "", "quality": req.quality or "", "n": str(req.n),
        "stream": _BOOL_TEXT[bool(req.stream)], "status": str(status),
        "input_tokens": str(usage.input_text_tokens + usage.input_image_tokens),
        "input_text_tokens": str(usage.input_text_tokens), "input_image_tokens": str(usage.input_image_tokens),
        "output_tokens": str(usage.output_tokens), "total_tokens": str(usage.total_tokens),
        "images": str(usage.images), "usd": usd_text(usage.usd_micros), "latency_ms": str(latency_ms),
        "incomplete": _BOOL_TEXT[bool(incomplete)], "client_gone": _BOOL_TEXT[bool(client_gone)],
        "settled": _BOOL_TEXT[settled],
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_record(fields: Mapping[Any, Any]) -> dict[str, Any]:
    """A stream entry's fields as typed values, in schema order (unknown fields are dropped)."""
    raw = {_text(k): _text(v) for k, v in fields.items()}
    out: dict[str, Any] = {}
    for name in FIELDS:
        value = raw.get(name, _DEFAULTS.get(name, ""))
        if name in _INTS:
            out[name] = int(value or 0)
        elif name in _BOOLS:
            out[name] = value == "true" or (not value and name in _TRUE_IF_ABSENT)
        elif name in _OPTIONAL:
            out[name] = value or None
        else:
            out[name] = value
    return out


def jsonl_line(record: Mapping[str, Any]) -> bytes:
    return orjson.dumps(record) + b"\n"


# A spreadsheet runs a cell that starts with one of these as a formula (SPEC §6): "=HYPERLINK(...)".
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if text.startswith(_FORMULA_START):
        text = "'" + text
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def csv_line(values: Iterable[Any]) -> bytes:
    """One RFC 4180 CSV row (CRLF-terminated, as the csv module writes it)."""
    return (",".join(_csv_cell(v) for v in values) + "\r\n").encode()


CSV_HEADER = csv_line(FIELDS)


def csv_record(record: Mapping[str, Any]) -> bytes:
    return csv_line(record[name] for name in FIELDS)


# --- reading -----------------------------------------------------------------------------------


def period_key(keys: RedisKeys, user: str, period: str) -> str:
    """The aggregate hash of a UTC day (``YYYY-MM-DD``) or month (``YYYY-MM``); ValueError otherwise."""
    if _DAY_RE.match(period):
        datetime.strptime(period, "%Y-%m-%d")
        return keys.day_usage(user, period)
    if _MONTH_RE.match(period):
        datetime.strptime(period, "%Y-%m")
        return keys.month_usage(user, period)
    raise ValueError("period must be a UTC day YYYY-MM-DD or month YYYY-MM")


async def period_totals(client: Any, keys: RedisKeys, user: str, period: str) -> dict[str, Any]:
    """A user's settled usage in a day or month, from its aggregate hash (one HGETALL)."""
    raw = {_text(k): int(v) for k, v in (await client.hgetall(period_key(keys, user, period))).items()}
    totals: dict[str, Any] = {"user": user, "period": period}
    totals.update({name: raw.get(name, 0) for name in TOTAL_FIELDS})
    totals["usd"] = usd_text(raw.get("usd_micros", 0))
    return totals


async def known_users(client: Any, keys: RedisKeys) -> list[str]:
    """Every user in the users index, sorted (SSCAN: no single huge reply)."""
    users = {_text(u) async for u in client.sscan_iter(keys.users(), count=1000)}
    return sorted(users)


async def iter_records(client: Any, keys: RedisKeys, start_ms: int, end_ms: int, *, user: str | None = None,
                       page: int = 1000) -> AsyncIterator[dict[str, Any]]:
    """Records with ``start_ms <= time < end_ms``: user by user, each in settle order, page by page."""
    users = [user] if user is not None else await known_users(client, keys)
    for name in users:
        stream = keys.ledger(name)
        cursor = str(max(start_ms - SKEW_MS, 0))
        while True:
            entries = await client.xrange(stream, min=cursor, max="+", count=page)
            for _entry_id, fields in entries:
                record = decode_record(fields)
                if start_ms <= parse_iso(record["time"]) < end_ms:
                    yield record
            if len(entries) < page:
                break
            cursor = "(" + _text(entries[-1][0])


async def export_lines(records: AsyncIterator[dict[str, Any]], fmt: str) -> AsyncIterator[bytes]:
    """``records`` as JSON lines or CSV (with a header row)."""
    if fmt == "csv":
        yield CSV_HEADER
        async for record in records:
            yield csv_record(record)
    else:
        async for record in records:
            yield jsonl_line(record)
