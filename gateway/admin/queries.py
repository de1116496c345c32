"""Parameters of usage reports, checked the same way for the admin API and the CLI."""

from __future__ import annotations

from gateway.errors import InvalidRequest, MissingParameter
from gateway.metering.ledger import parse_iso
from gateway.validators import valid_name

MEDIA_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


def parse_user(value: str | None, *, required: bool, param: str = "user") -> str | None:
    """A user (or team) name as the config allows it; InvalidRequest naming ``param`` otherwise."""
    if value is None or value == "":
        if required:
            raise MissingParameter(f"Missing required parameter: '{param}'.", param=param)
        return None
    if not valid_name(value):
        raise InvalidRequest(f"'{param}' must be letters, digits and . _ @ - (at most 128).", param=param)
    return value


def parse_range(start: str, end: str) -> tuple[int, int]:
    """``from`` and ``to`` as ms since the epoch, ``from < to``; InvalidRequest naming the bad one."""
    bounds = []
    for name, text in (("from", start), ("to", end)):
        try:
            bounds.append(parse_iso(text))
        except ValueError:
            raise InvalidRequest(f"'{name}' must be an ISO 8601 time, e.g. 2026-11-24T00:00:00Z.",
                                 param=name) from None
    if bounds[0] >= bounds[1]:
        raise InvalidRequest("'from' must be earlier than 'to'.", param="from")
    return bounds[0], bounds[1]


def parse_format(value: str | None) -> str:
    fmt = value or "jsonl"
    if fmt not in MEDIA_TYPES:
        raise InvalidRequest("'format' must be jsonl or csv.", param="format")
    return fmt
