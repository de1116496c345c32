"""A job as stored (one Redis hash) and as users see it (``image.job``)."""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from gateway.auth.authenticator import Principal
from gateway.config import Limits

QUEUED, IN_PROGRESS, SUCCEEDED, FAILED = "queued", "in_progress", "succeeded", "failed"
FINISHED = (SUCCEEDED, FAILED)


def new_job_id() -> str:
    return "imgjob_" + secrets.token_hex(12)


@dataclass(slots=True)
class Job:
    """One job's state: who submitted what, what it reserved, and what became of it."""

    id: str
    user: str
    team: str | None
    key_id: str
    plan: str
    limits: Limits
    models: tuple[str, ...] | None
    route: str
    body: bytes  # the validated request as it goes upstream
    n: int
    model: str
    created_ms: int
    day: str  # the UTC day and month its quota reservation was made in (usage counts there)
    month: str
    status: str = QUEUED
    started_ms: int | None = None
    completed_ms: int | None = None
    attempts: int = 0
    result: Any = None  # the ImagesResponse, images as URLs
    error: Any = None  # an OpenAI error object
    webhook: dict[str, Any] = field(default_factory=dict)  # delivery state, when the key has a webhook

    def principal(self) -> Principal:
        """The submitter as admission and metering see it (its limits as at submission)."""
        models = None if self.models is None else frozenset(self.models)
        return Principal(self.key_id, self.user, self.team, self.plan, self.limits, models)

    def to_hash(self) -> dict[str, bytes | str]:
        """The fields of the job's Redis hash."""
        out: dict[str, bytes | str] = {
            "id": self.id, "user": self.user, "team": self.team or "", "key_id": self.key_id, "plan": self.plan,
            "limits": orjson.dumps(asdict(self.limits)), "models": orjson.dumps(self.models), "route": self.route,
            "body": self.body, "n": str(self.n), "model": self.model, "created_ms": str(self.created_ms),
            "day": self.day, "month": self.month, "status": self.status, "attempts": str(self.attempts)}
        return out

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> Job:
        h = {k.decode(): v for k, v in raw.items()}

        def text(name: str) -> str:
            return h[name].decode()

        def opt_int(name: str) -> int | None:
            return int(h[name]) if h.get(name) else None

        def opt_json(name: str) -> Any:
            return orjson.loads(h[name]) if h.get(name) else None

        models = orjson.loads(h["models"])
        return cls(id=text("id"), user=text("user"), team=text("team") or None, key_id=text("key_id"),
                   plan=text("plan"), limits=Limits(**orjson.loads(h["limits"])),
                   models=None if models is None else tuple(models), route=text("route"), body=h["body"],
                   n=int(h["n"]), model=text("model"), created_ms=int(h["created_ms"]), day=text("day"),
                   month=text("month"), status=text("status"), started_ms=opt_int("started_ms"),
                   completed_ms=opt_int("completed_ms"), attempts=int(h.get("attempts") or 0),
                   result=opt_json("result"), error=opt_json("error"), webhook=opt_json("webhook") or {})

    def public(self) -> dict[str, Any]:
        """The ``image.job`` object of SPEC section 10 (plus the webhook's delivery state, if any)."""
        out: dict[str, Any] = {
            "id": self.id, "object": "image.job", "status": self.status, "created_at": self.created_ms // 1000,
            "completed_at": None if self.completed_ms is None else self.completed_ms // 1000,
            "result": self.result, "error": self.error}
        if self.webhook:
            out["webhook"] = self.webhook
        return out


def now_ms() -> int:
    return time.time_ns() // 1_000_000
