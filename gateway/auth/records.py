"""A gateway key's record: what its creator chooses (``KeySpec``) and what Redis keeps (``StoredKey``).

``StoredKey`` is a ``KeySpec`` plus what the key store adds (id, creation time, revocation), so
a field added to the spec is stored, listed and looked up without a second definition to keep
in step. Never the plaintext key.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySpec:
    """A validated request for a new key (the admin API's create body)."""

    user: str
    team: str | None
    plan: str
    limits: dict[str, Any]
    models: tuple[str, ...] | None
    name: str | None
    expires_at: str | None
    webhook_url: str | None = None  # finished jobs are POSTed here (its signing secret is kept apart)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredKey(KeySpec):
    """A key record as kept in Redis: its spec, id, creation time and whether it is revoked."""

    id: str
    created_at: str
    revoked: bool = False

    @classmethod
    def of(cls, spec: KeySpec, *, id: str, created_at: str) -> StoredKey:
        """The new record of a key created from ``spec``."""
        return cls(id=id, created_at=created_at, **{f: getattr(spec, f) for f in SPEC_FIELDS})

    def usable(self, now: datetime) -> bool:
        if self.revoked:
            return False
        return self.expires_at is None or datetime.fromisoformat(self.expires_at.replace("Z", "+00:00")) > now


SPEC_FIELDS = tuple(f.name for f in fields(KeySpec))
RECORD_FIELDS = tuple(f.name for f in fields(StoredKey))
