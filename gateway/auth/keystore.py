"""Gateway keys kept in Redis: create (plaintext shown once), list, revoke, look up by digest.

A key is ``sk-igw-<prefix>_<secret>``: 8 visible characters, then 256 random bits. Its id
is ``key_<prefix>``. Only the key's SHA-256 (``config.key_digest``) is written to Redis.

Redis layout (``RedisKeys``), each key touched by its own command, so it works the same on
a Redis Cluster (no multi-key command spans two slots):

=========================  ======  ==========================================================
key                        type    content
=========================  ======  ==========================================================
``key:<sha256>``           hash    the record: id user team plan limits models name
                                   created_at expires_at revoked revoked_at (values JSON)
                                   webhook_url, and webhook_secret (never in a key object but
                                   the create answer: it signs the key's job webhooks)
``keyid:<id>``             string  the key's sha256 (revoke by id)
``{u:<user>}:keys``        set     ids of the user's keys that are not revoked
``users``                  set     every user a key was ever created for
=========================  ======  ==========================================================

Create reserves the id (``SET NX``), indexes it, then writes the record last: a key is
usable only once it is fully indexed, and a failure half way leaves nothing usable (the
plaintext was never returned). Revoke marks the record ``revoked`` (kept, so the lookup
answers "revoked" and a repeated revoke is harmless) and drops the id from the user's
set. Authenticator caches lookups for ``auth.key_cache_seconds`` (< 5 s): every replica
refuses a revoked key within 5 s.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import secrets
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.auth.records import RECORD_FIELDS, SPEC_FIELDS, KeySpec, StoredKey
from gateway.config import ConfigError, Settings, _limits, _model_list, key_digest
from gateway.errors import InvalidRequest, MissingParameter, ServiceUnavailable
from gateway.jobs.ssrf import check_webhook_url
from gateway.redisdb.client import REDIS_ERRORS
from gateway.redisdb.keys import RedisKeys
from gateway.validators import control_free, valid_name

KEY_PREFIX = "sk-igw-"
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
_PREFIX_LEN = 8
_NAME_MAX = 200
_ID_ATTEMPTS = 5
KEY_ID_RE = re.compile(r"^key_[a-z0-9]{8}$")


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso_utc(dt: datetime) -> str:
    """``2026-11-24T12:00:00Z``: whole seconds, UTC."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key just created: the plaintext and the webhook secret (both shown once) and its record."""

    key: str
    record: StoredKey
    webhook_secret: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = key_object(self.record, self.key)
        if self.webhook_secret is not None:
            out["webhook_secret"] = self.webhook_secret
        return out


def key_object(record: StoredKey, key: str | None = None) -> dict[str, Any]:
    """The admin API's key object (SPEC §6); ``key`` only in the answer to create."""
    out: dict[str, Any] = {"id": record.id}
    if key is not None:
        out["key"] = key
    out.update(user=record.user, team=record.team, plan=record.plan, limits=dict(record.limits),
               models=None if record.models is None else list(record.models), name=record.name,
               created_at=record.created_at, expires_at=record.expires_at, webhook_url=record.webhook_url)
    return out


def _invalid(exc: ConfigError) -> InvalidRequest:
    return InvalidRequest(f"Invalid '{exc.key}': {exc.reason}.", param=exc.key)


def _name(value: Any, param: str, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise MissingParameter(f"Missing required parameter: '{param}'.", param=param)
        return None
    if not valid_name(value):
        raise InvalidRequest(f"Invalid '{param}': 1 to 128 of letters, digits and . _ @ -.", param=param)
    return value


def _user(value: Any) -> str:
    user = _name(value, "user", required=True)
    assert user is not None
    return user


def _expires_at(value: Any, now: datetime) -> str | None:
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError
        when = datetime.fromisoformat(value)
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)  # naive: UTC
    except (ValueError, OverflowError):
        raise InvalidRequest("Invalid 'expires_at': must be an ISO 8601 date-time in UTC, e.g. "
                             "2027-01-31T00:00:00Z.", param="expires_at") from None
    when = when.replace(microsecond=0)  # stored to the second
    if when <= now:
        raise InvalidRequest("Invalid 'expires_at': must be in the future.", param="expires_at")
    return iso_utc(when)


def validate_key_spec(body: Mapping[str, Any], settings: Settings, now: datetime) -> KeySpec:
    """Check a create request with the config file's rules; raises InvalidRequest naming ``param``."""
    for field_name in body:
        if field_name not in SPEC_FIELDS:
            raise InvalidRequest(f"Unrecognized request argument supplied: '{field_name}' (allowed: "
                                 f"{', '.join(SPEC_FIELDS)}).", param=str(field_name))
    user = _user(body.get("user"))
    team = _name(body.get("team"), "team", required=False)
    plan = body.get("plan", "default")
    if plan is None:
        plan = "default"
    if not isinstance(plan, str) or plan not in settings.plans:
        raise InvalidRequest(f"Invalid 'plan': no plan named {plan!r} (configured: "
                             f"{', '.join(sorted(settings.plans))}).", param="plan")
    try:
        limits = _limits(body.get("limits"), "limits")
        models = _model_list(body.get("models"), "models", settings.models)
    except ConfigError as exc:
        raise _invalid(exc) from None
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > _NAME_MAX or not control_free(name)):
        raise InvalidRequest(f"Invalid 'name': must be a string of at most {_NAME_MAX} characters, without "
                             "control characters.", param="name")
    webhook_url = body.get("webhook_url")
    if webhook_url is not None:
        webhook_url = check_webhook_url(webhook_url, settings.jobs.allow_private_webhooks)
    return KeySpec(user=user, team=team, plan=plan, limits=limits, models=models, name=name,
                   expires_at=_expires_at(body.get("expires_at"), now), webhook_url=webhook_url)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _encode(record: StoredKey) -> dict[str, str]:
    return {f: json.dumps(list(v) if isinstance(v := getattr(record, f), tuple) else v) for f in RECORD_FIELDS}


def _decode(raw: Mapping[Any, Any]) -> StoredKey:
    data = {_text(k): json.loads(_text(v)) for k, v in raw.items()}
    models = data.get("models")
    return StoredKey(id=data["id"], user=data["user"], team=data.get("team"), plan=data["plan"],
                     limits=dict(data.get("limits") or {}), models=None if models is None else tuple(models),
                     name=data.get("name"), created_at=data["created_at"], expires_at=data.get("expires_at"),
                     revoked=bool(data.get("revoked")), webhook_url=data.get("webhook_url"))


def new_key() -> tuple[str, str]:
    """A fresh ``(key id, plaintext key)``."""
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(_PREFIX_LEN))
    return f"key_{prefix}", f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"


class KeyStore:
    """Gateway keys in Redis; the one implementation behind the admin API and ``gateway keys``."""

    def __init__(self, client: Any, keys: RedisKeys, settings: Settings, *, metrics: Any = None,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self._redis = client
        self._keys = keys
        self._settings = settings
        self._metrics = metrics
        self._clock = clock

    @contextlib.contextmanager
    def _redis_errors(self, op: str) -> Iterator[None]:
        try:
            yield
        except REDIS_ERRORS as exc:
            if self._metrics is not None:
                self._metrics.redis_errors.labels(op).inc()
            raise ServiceUnavailable("The gateway's key store is unavailable; try again shortly.") from exc

    async def create(self, body: Mapping[str, Any]) -> NewKey:
        """Validate ``body`` (the admin API's create body) and store a new key; invalid: nothing written."""
        now = self._clock()
        spec = validate_key_spec(body, self._settings, now)
        k = self._keys
        with self._redis_errors("key_create"):
            for _ in range(_ID_ATTEMPTS):
                key_id, plaintext = new_key()
                digest = key_digest(plaintext)
                if await self._redis.set(k.api_key_id(key_id), digest, nx=True):
                    break
            else:  # 36**8 ids: five collisions in a row means something else is wrong
                raise ServiceUnavailable("Could not allocate a key id; try again.")
            record = StoredKey.of(spec, id=key_id, created_at=iso_utc(now))
            fields = _encode(record)
            secret = None
            if spec.webhook_url is not None:
                # Standard Webhooks: whsec_ + base64 of 24 random bytes; kept to sign, shown only now.
                secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
                fields["webhook_secret"] = json.dumps(secret)
            pipe = self._redis.pipeline(transaction=False)
            pipe.sadd(k.user_keys(spec.user), key_id)
            pipe.sadd(k.users(), spec.user)
            await pipe.execute()
            await self._redis.hset(k.api_key(digest), mapping=fields)
        return NewKey(key=plaintext, record=record, webhook_secret=secret)

    async def webhook(self, key_id: str) -> tuple[str, str] | None:
        """The key's webhook URL and signing secret, if it has a webhook (revoked keys too: the job was theirs)."""
        k = self._keys
        with self._redis_errors("key_lookup"):
            digest = await self._redis.get(k.api_key_id(key_id))
            if digest is None:
                return None
            url, secret = await self._redis.hmget(k.api_key(_text(digest)), "webhook_url", "webhook_secret")
        if url is None or secret is None or json.loads(_text(url)) is None:
            return None
        return json.loads(_text(url)), json.loads(_text(secret))

    async def lookup(self, digest: str) -> StoredKey | None:
        """The record of the key with this SHA-256, revoked and expired ones included (one HGETALL)."""
        with self._redis_errors("key_lookup"):
            raw = await self._redis.hgetall(self._keys.api_key(digest))
        return _decode(raw) if raw else None

    async def list(self, user: str | None) -> list[StoredKey]:
        """The user's keys that are not revoked (expired ones included), oldest first."""
        user = _user(user)
        k = self._keys
        with self._redis_errors("key_list"):
            ids = sorted(_text(i) for i in await self._redis.smembers(k.user_keys(user)))
            if not ids:
                return []
            pipe = self._redis.pipeline(transaction=False)
            for key_id in ids:
                pipe.get(k.api_key_id(key_id))
            digests = [_text(d) for d in await pipe.execute() if d is not None]
            pipe = self._redis.pipeline(transaction=False)
            for digest in digests:
                pipe.hgetall(k.api_key(digest))
            raws = await pipe.execute()
        records = [_decode(raw) for raw in raws if raw]
        active = (r for r in records if not r.revoked and r.user == user)
        return sorted(active, key=lambda r: (r.created_at, r.id))

    async def revoke(self, key_id: str) -> bool:
        """Mark the key revoked; False if no key has this id. Revoking twice is harmless."""
        if not KEY_ID_RE.match(key_id):
            return False
        k = self._keys
        with self._redis_errors("key_revoke"):
            digest = await self._redis.get(k.api_key_id(key_id))
            if digest is None:
                return False
            record_key = k.api_key(_text(digest))
            user = await self._redis.hget(record_key, "user")
            if user is None:  # a create that failed before writing its record
                return False
            pipe = self._redis.pipeline(transaction=False)  # one key, one slot
            pipe.hset(record_key, "revoked", "true")
            pipe.hsetnx(record_key, "revoked_at", json.dumps(iso_utc(self._clock())))
            await pipe.execute()
            await self._redis.srem(k.user_keys(json.loads(_text(user))), key_id)
        return True
