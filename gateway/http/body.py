"""Reading request bodies: bounded while reading, and JSON objects parsed once."""

from __future__ import annotations

import json
import logging
import re
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
        if isinstance(exc, _DuplicateKey) and not _SURROGATE.search(exc.name):
            raise InvalidRequest(f"The field '{exc.name}' is given more than once.", param=exc.name) from None
        raise InvalidRequest("We could not parse the JSON body of your request. The body must be a JSON "
                             "object (Content-Type: application/json).") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if _SURROGATE_ESCAPE.search(body) and _holds_surrogate(data):
        # JSON lets "\ud800" through, but it is no Unicode text: it could be neither stored nor answered in UTF-8.
        raise InvalidRequest("The JSON body holds a lone UTF-16 surrogate escape (such as \\ud800), which is not "
                             "valid Unicode.")
    return data


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a cheap filter: only such a body can decode to one
_SURROGATE = re.compile("[\ud800-\udfff]")


def _holds_surrogate(data: Any) -> bool:
    """Whether a lone surrogate is in any string of ``data`` (keys included); pairs decode to one character.

    A loop, not recursion: ``json.loads`` accepts nesting deeper than a recursive walk could follow."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return True
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


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
