"""``gateway usage totals|export``: the usage admin API, straight against Redis.

Same reading code as ``GET /admin/usage`` and ``GET /admin/usage/records`` (``gateway.metering.ledger``),
with the Redis URL and key prefix of ``--config`` (default ``$GATEWAY_CONFIG``; ``REDIS_URL``
overrides). Exit status: 0 done, 1 Redis unavailable or the output not writable (each says
which), 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any, Protocol

from gateway.admin.queries import parse_format, parse_range, parse_user
from gateway.cli.common import command_group, run_against_redis
from gateway.config import Settings
from gateway.errors import InvalidRequest
from gateway.metering.ledger import export_lines, iter_records, period_totals
from gateway.redisdb.keys import RedisKeys

PROGRESS_EVERY_S = 1.0


class Sink(Protocol):
    def write(self, data: bytes, /) -> Any: ...

    def flush(self) -> None: ...


UsageAction = Callable[[Any, RedisKeys, argparse.Namespace, Sink], Awaitable[int]]


class OutputError(Exception):
    """The output could not be written (kept apart from REDIS_ERRORS, which include OSError)."""


class Output:
    """The command's output; its OSErrors become OutputError, so they are never reported as Redis ones."""

    def __init__(self, raw: IO[bytes], name: str) -> None:
        self.raw = raw
        self.name = name

    def write(self, data: bytes) -> None:
        try:
            self.raw.write(data)
        except OSError as exc:
            raise OutputError(f"cannot write {self.name}: {exc.strerror or exc}") from exc

    def flush(self) -> None:
        try:
            self.raw.flush()
        except OSError as exc:
            raise OutputError(f"cannot write {self.name}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        """Close a file we opened (its last buffered write may fail here too)."""
        if self.raw is not sys.stdout.buffer:
            try:
                self.raw.close()
            except OSError as exc:
                raise OutputError(f"cannot write {self.name}: {exc.strerror or exc}") from exc


def open_output(path: str | None) -> Output:
    """``path`` opened for writing (stdout if None); OutputError if it cannot be."""
    if path is None:
        return Output(sys.stdout.buffer, "stdout")
    try:
        return Output(open(path, "wb"), path)  # closed by Output.close
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc


class Progress:
    """A record counter on stderr, rewritten in place on a terminal, a line per second otherwise."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.count = 0
        self._tty = stream.isatty()
        self._last = time.monotonic()

    def tick(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            self._show(final=False)

    def done(self) -> None:
        self._show(final=True)

    def _show(self, *, final: bool) -> None:
        text = f"exported {self.count} records"
        if self._tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


async def _totals(client: Any, keys: RedisKeys, args: argparse.Namespace, out: Sink) -> int:
    user = parse_user(args.user, required=True)
    assert user is not None
    try:
        totals = await period_totals(client, keys, user, args.period)
    except ValueError:
        raise InvalidRequest("--period must be a UTC day YYYY-MM-DD or month YYYY-MM.", param="period") from None
    out.write(json.dumps(totals, indent=2).encode() + b"\n")
    return 0


async def _export(client: Any, keys: RedisKeys, args: argparse.Namespace, out: Sink) -> int:
    start_ms, end_ms = parse_range(args.start, args.end)
    user = parse_user(args.user, required=False)
    fmt = parse_format(args.format)
    progress = Progress(sys.stderr)
    records = iter_records(client, keys, start_ms, end_ms, user=user)
    async for line in export_lines(_counted(records, progress), fmt):
        out.write(line)
    progress.done()
    return 0


async def _counted(records: Any, progress: Progress) -> Any:
    async for record in records:
        progress.tick()
        yield record


def _run(args: argparse.Namespace, action: UsageAction) -> int:
    """Run ``action(client, keys, args, out)`` against Redis; the exit status (see the module docstring)."""

    async def with_output(settings: Settings, client: Any, keys: RedisKeys) -> int:
        out = open_output(getattr(args, "output", None))
        try:
            code = await action(client, keys, args, out)
            out.flush()
        finally:
            out.close()
        return code

    try:
        return run_against_redis(args, with_output)
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _totals_command(args: argparse.Namespace) -> int:
    return _run(args, _totals)


def _export_command(args: argparse.Namespace) -> int:
    return _run(args, _export)


def register(subparsers: Any) -> None:
    """Add ``gateway usage totals|export`` to the ``gateway`` command."""
    add = command_group(subparsers, "usage", "usage totals and record export (billing)")
    totals = add("totals", "a user's usage in a UTC day or month (as GET /admin/usage)", _totals_command)
    totals.add_argument("--user", required=True)
    totals.add_argument("--period", required=True, help="YYYY-MM-DD (UTC day) or YYYY-MM (UTC month)")

    export = add("export", "records with from <= time < to (as GET /admin/usage/records)", _export_command)
    export.add_argument("--from", dest="start", required=True, help="ISO 8601, e.g. 2026-11-01T00:00:00Z")
    export.add_argument("--to", dest="end", required=True, help="ISO 8601, exclusive")
    export.add_argument("--user", default=None, help="only this user (default: every user)")
    export.add_argument("--format", default="jsonl", choices=("jsonl", "csv"),
                        help="jsonl (default, as the admin API) or csv")
    export.add_argument("--output", default=None, help="file to write (default: stdout)")
