"""Where stored answer bodies live: inline in the Redis record, or in the image store by reference.

SPEC §9: large bodies go to the image store when one is configured. ``put`` returns a reference
for the bodies it keeps elsewhere, and the record then holds the reference instead of the bytes.
Without a store (``InlineBodies``) every body stays inline.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

# Below this an answer (an error, a small image) costs Redis less than an S3 round trip costs time.
STORE_BODIES_FROM_BYTES = 64 * 1024


class AnswerBodies(Protocol):
    async def put(self, name: str, body: bytes) -> str | None:
        """Keep ``body`` under ``name``; a reference to it, or None to store it inline in Redis."""

    async def get(self, ref: str) -> bytes:
        """The body ``put`` kept under ``ref``."""


class BlobStore(Protocol):
    """What the image store (gateway/imagestore/store.py ``ImageStore``) offers for blobs."""

    async def put_blob(self, key: str, data: bytes) -> None: ...

    async def get_blob(self, key: str) -> bytes | None: ...


class InlineBodies:
    """Every body inline in the Redis record (the default: no image store)."""

    async def put(self, name: str, body: bytes) -> str | None:
        return None

    async def get(self, ref: str) -> bytes:
        raise LookupError(f"no body store holds {ref!r}")


class StoreBodies:
    """Bodies of ``min_bytes`` or more in the image store, content-addressed; smaller ones inline."""

    def __init__(self, store: BlobStore, min_bytes: int = STORE_BODIES_FROM_BYTES) -> None:
        self.store = store
        self.min_bytes = min_bytes

    async def put(self, name: str, body: bytes) -> str | None:
        if len(body) < self.min_bytes:
            return None
        # By content: repeats of one answer share the object. Objects follow the bucket's lifecycle
        # rule: keep it longer than idempotency.ttl_seconds.
        key = f"idempotency/{hashlib.sha256(body).hexdigest()}"
        await self.store.put_blob(key, body)
        return key

    async def get(self, ref: str) -> bytes:
        body = await self.store.get_blob(ref)
        if body is None:
            raise LookupError(f"the stored answer {ref!r} is gone from the image store")
        return body
