"""Where stored answer bodies live: inline in the Redis record, or elsewhere by reference.

The seam for the image store (SPEC §9: large bodies go there when one is configured): an
implementation returns a reference from ``put`` for the bodies it keeps, and the record then
holds the reference instead of the bytes. Without a store every body stays inline.
"""

from __future__ import annotations

from typing import Protocol


class AnswerBodies(Protocol):
    async def put(self, name: str, body: bytes) -> str | None:
        """Keep ``body`` under ``name``; a reference to it, or None to store it inline in Redis."""

    async def get(self, ref: str) -> bytes:
        """The body ``put`` kept under ``ref``."""


class InlineBodies:
    """Every body inline in the Redis record (the default: no image store)."""

    async def put(self, name: str, body: bytes) -> str | None:
        return None

    async def get(self, ref: str) -> bytes:
        raise LookupError(f"no body store holds {ref!r}")
