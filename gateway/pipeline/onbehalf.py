"""What the gateway sends upstream on a user's behalf, under the one upstream key all users share.

The body's ``user`` becomes an opaque id derived from the gateway user (the client's own
value could name anyone, or collide with another team's), and a client's
``Idempotency-Key`` is namespaced per user, so two users' keys can never meet upstream.
"""

from __future__ import annotations

import hashlib


def upstream_user(user: str) -> str:
    """The stable, opaque id the upstream sees for a gateway user."""
    return "igw-" + hashlib.sha256(b"user\0" + user.encode()).hexdigest()[:32]


def upstream_idempotency_key(user: str, key: str) -> str:
    """A client's Idempotency-Key as the upstream sees it: scoped to the gateway user."""
    return hashlib.sha256(b"idem\0" + user.encode() + b"\0" + key.encode()).hexdigest()
