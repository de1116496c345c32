"""Reading request bodies: bounded while reading, and JSON objects parsed once."""

from __future__ import annotations

import orjson
from starlette.requests import Request

from gateway.errors import InvalidRequest, RequestTooLarge


async def read_body(request: Request, limit: int) -> bytes:
    """The raw request body, refused with 413 past ``limit`` bytes (checked while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"Request body is larger than the limit of {limit} bytes.")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"Request body is larger than the limit of {limit} bytes.")
        parts.append(chunk)
    return b"".join(parts)


def parse_json_object(body: bytes) -> dict[str, object]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("We could not parse the JSON body of your request. The body must be a JSON "
                             "object (Content-Type: application/json).") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data
