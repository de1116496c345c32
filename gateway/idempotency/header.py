"""The ``Idempotency-Key`` request header: 1 to 255 printable ASCII characters, given once."""

from __future__ import annotations

import re

from starlette.datastructures import Headers

from gateway.errors import InvalidRequest

HEADER = "Idempotency-Key"
_VALID = re.compile(r"[\x20-\x7e]{1,255}")


def idempotency_key(headers: Headers) -> str | None:
    """The request's Idempotency-Key, None without one; 400 ``invalid_value`` when malformed."""
    values = headers.getlist(HEADER)
    if not values:
        return None
    if len(values) > 1 or not _VALID.fullmatch(values[0]):
        raise InvalidRequest(f"The {HEADER} header must be given once, as 1 to 255 printable ASCII characters.",
                             param=HEADER)
    return values[0]
