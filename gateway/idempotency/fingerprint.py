"""Request fingerprints: what makes two requests under one Idempotency-Key "the same request".

Front doors hand the pipeline a fingerprint function (``Prepared.fingerprint``); it runs only for a
request that carries an Idempotency-Key, so hashing an edit's files costs nothing otherwise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import IO, Any

import orjson

READ_SIZE = 1 << 16


def json_fingerprint(data: Any) -> str:
    """The validated request's fingerprint: key order and formatting of the client's JSON do not count."""
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


def body_fingerprint(body: bytes) -> str:
    """The fingerprint of exactly these bytes (a front door that computes no fingerprint of its own)."""
    return hashlib.sha256(body).hexdigest()


def form_fingerprint(fields: Iterable[tuple[str, str]], files: Iterable[tuple[str, str, str, IO[bytes]]]) -> str:
    """A multipart request's fingerprint: its validated text fields (in any order) and, in order, each
    file's field name, filename, content type and content (not the client's boundary or part layout)."""
    digest = hashlib.sha256(orjson.dumps(sorted(fields)))
    for field, filename, content_type, file in files:
        digest.update(orjson.dumps([field, filename, content_type]))
        file.seek(0)
        content = hashlib.sha256()
        while chunk := file.read(READ_SIZE):
            content.update(chunk)
        digest.update(content.digest())
    return digest.hexdigest()
