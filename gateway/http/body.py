"""Reading request bodies: bounded while reading, and JSON objects parsed once."""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.requests import ClientDisconnect, Request

from gateway.errors import ClientGone, InvalidRequest, RequestTooLarge

log = logging.getLogger("gateway")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw request body, refused with 413 past ``limit`` bytes (checked while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"Request body is larger than the limit of {limit} bytes.")
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(f"Request body is larger than the limit of {limit} bytes.")
            parts.append(chunk)
    except ClientDisconnect:
        raise client_gone(request, size) from None
    return b"".join(parts)


def client_gone(request: Request, size: int) -> ClientGone:
    """The error for a client that disconnected after ``size`` bytes of its body, logged in one line."""
    # Routine on a busy gateway (timeouts, cancelled uploads): one INFO line, never a traceback.
    log.info("client disconnected mid-upload after %d bytes (request %s)", size, request.scope.get("request_id", "-"))
    return ClientGone("The client disconnected before its request body arrived.")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; a key given twice (at any depth) is refused, naming it.

    Parsers disagree on duplicates (first wins, last wins, error): the gateway validates one
    reading and forwards exactly that reading, so it refuses any body that has two.
    """
    try:
        data = json.loads(body, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        if isinstance(exc, _DuplicateKey):
            raise InvalidRequest(f"The field '{exc.name}' is given more than once.", param=exc.name) from None
        raise InvalidRequest("We could not parse the JSON body of your request. The body must be a JSON "
                             "object (Content-Type: application/json).") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


class _DuplicateKey(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _DuplicateKey(name)
            seen.add(name)
    return data


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: refuse them as a strict parser upstream would."""
    raise ValueError(f"{name} is not valid JSON")
