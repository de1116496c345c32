"""Request fingerprints: what makes two requests under one Idempotency-Key "the same request"."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson


def json_fingerprint(data: Any) -> str:
    """The validated request's fingerprint: key order and formatting of the client's JSON do not count."""
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


def body_fingerprint(body: bytes) -> str:
    """The fingerprint of exactly these bytes (a front door that computes no fingerprint of its own)."""
    return hashlib.sha256(body).hexdigest()
