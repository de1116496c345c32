"""Settings: one YAML file plus environment overrides; secrets only from the environment.

``load_settings(path)`` raises ``ConfigError`` naming the key and the reason, so a bad
file fails at start (and in ``gateway check-config``) instead of at the first request.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from gateway.http.settings import ServerSettings
from gateway.idempotency.settings import IdempotencySettings
from gateway.imagestore.settings import StorageSettings
from gateway.jobs.settings import JobsSettings
from gateway.limits.settings import LeaseSettings
from gateway.sections import ENV_OVERRIDES as ENV_OVERRIDES  # re-exported
from gateway.sections import check_known as _check_known
from gateway.sections import mapping as _mapping
from gateway.sections import section as _section
from gateway.validators import LIMIT_MAX, check_number, control_free, valid_name
from gateway.validators import ConfigError as ConfigError  # re-exported: the config's error

DEFAULT_MODELS = ("gpt-image-2", "gpt-image-1.5", "gpt-image-1", "dall-e-2", "dall-e-3")
FAMILIES = ("gpt-image", "dall-e-2", "dall-e-3")
MAX_FLUSH_SECONDS = 60  # metrics.flush_seconds: longer and /metrics lags the workers by more than a scrape
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def default_spool_path(env: Mapping[str, str]) -> str:
    """``$XDG_STATE_HOME/gateway/usage.spool``, else ``$HOME/.local/state/gateway/usage.spool``."""
    state = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "gateway", "usage.spool")


@dataclass(frozen=True)
class Limits:
    """A user's limits; ``None`` means unlimited."""

    requests_per_minute: int | None = None
    images_per_minute: int | None = None
    max_concurrent_requests: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    images_per_day: int | None = None
    images_per_month: int | None = None
    usd_per_month: float | None = None

    def merged(self, overrides: Mapping[str, Any] | None) -> Limits:
        """These limits with a key's overrides on top (an explicit null means unlimited)."""
        if not overrides:
            return self
        return replace(self, **{k: v for k, v in overrides.items() if k in LIMIT_NAMES})


LIMIT_NAMES = tuple(f.name for f in fields(Limits))  # in the order of the fields above


@dataclass(frozen=True)
class Plan:
    name: str
    limits: Limits
    models: tuple[str, ...] | None = None  # allow-list; None: every enabled model


@dataclass(frozen=True)
class ModelConfig:
    """An enabled model: its validation family, prices and token-estimate overrides."""

    name: str
    family: str | None  # gpt-image | dall-e-2 | dall-e-3 | None (unknown: minimal checks)
    input_text_per_1m: float | None = None
    input_image_per_1m: float | None = None
    output_per_1m: float | None = None
    per_image: Mapping[str, float] | None = None  # "quality-size" -> usd, e.g. "hd-1024x1024"
    output_tokens: Mapping[str, int] | None = None  # "quality-size" -> estimate override
    input_image_tokens_per_image: int | None = None  # an edit's reservation per input image; None: default

    @property
    def priced(self) -> bool:
        return self.per_image is not None or any(
            p is not None for p in (self.input_text_per_1m, self.input_image_per_1m, self.output_per_1m)
        )


@dataclass(frozen=True)
class StaticKey:
    """A key fixed in the config file, known only by its SHA-256."""

    sha256: str
    user: str
    team: str | None
    plan: str
    limits: Mapping[str, Any] = field(default_factory=dict)
    models: tuple[str, ...] | None = None
    name: str | None = None


@dataclass(frozen=True)
class UpstreamSettings:
    base_url: str = "https://api.ttapi.io"
    timeout_seconds: float = 600.0
    connect_timeout_seconds: float = 10.0
    max_connections: int = 8192
    key_rest_seconds: float = 60.0
    max_response_bytes: int = 256 * 1024 * 1024  # an answer (or a stream's unsent backlog) beyond it: 502 / dropped
    api_keys: tuple[str, ...] = ()  # from TTAPI_API_KEY only


@dataclass(frozen=True)
class RedisSettings:
    url: str = "redis://localhost:6379/0"
    key_prefix: str = "igw:"
    on_unavailable: str = "reject"
    cluster: bool = False
    timeout_seconds: float = 0.5
    max_connections: int = 512
    pool_wait_seconds: float = 2.0  # a burst beyond max_connections waits this long for a connection
    pipeline_connections: int = 4  # admissions and settlements: one pipeline per loop tick (redisdb/batcher.py)
    health_interval_seconds: float = 0.5  # the circuit (redisdb/health.py): "down" only on failed pings
    health_timeout_seconds: float = 2.0
    health_failures: int = 2
    admission_queue: int = 10_000  # overload: shed (503 + retry-after), never queued without bound
    admission_wait_seconds: float = 10.0


@dataclass(frozen=True)
class MetricsSettings:
    user_label: bool = True
    port: int | None = None  # /metrics only on this port (not the API's); None: on the API port
    flush_seconds: float = 1.0  # several workers: each writes its values to its metrics files this often


@dataclass(frozen=True)
class AuthSettings:
    key_cache_seconds: float = 2.0  # < 5 s: a revoked key is refused by every replica within 5 s
    failed_attempts_per_minute: int = 20  # per client address, then refused (429) for block_seconds
    block_seconds: int = 300


@dataclass(frozen=True)
class UsageSettings:
    stream_maxlen: int = 10_000_000  # ledger stream trimmed (approximately) to this many records
    spool_path: str = ""  # "": default_spool_path(), a private directory of the user's
    settle_queue_size: int = 100_000


@dataclass(frozen=True)
class Settings:
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    usage: UsageSettings = field(default_factory=UsageSettings)
    jobs: JobsSettings = field(default_factory=JobsSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    idempotency: IdempotencySettings = field(default_factory=IdempotencySettings)
    limits: LeaseSettings = field(default_factory=LeaseSettings)
    default_model: str | None = "gpt-image-1"
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    plans: Mapping[str, Plan] = field(default_factory=dict)
    keys: tuple[StaticKey, ...] = ()
    max_body_bytes: int = 1024 * 1024
    max_edit_body_bytes: int = 64 * 1024 * 1024  # a whole multipart edit, files included
    admin_token: str | None = None  # from GATEWAY_ADMIN_TOKEN only
    metrics_token: str | None = None  # from GATEWAY_METRICS_TOKEN only: /metrics then needs it as a Bearer token

    def plan(self, name: str) -> Plan:
        """The named plan; a key whose plan was since removed from the config gets ``default``'s limits
        (never unlimited)."""
        return self.plans.get(name) or self.plans.get("default") or Plan(name="default", limits=Limits())


# --- parsing -----------------------------------------------------------------------------------

_TOP_KEYS = {"upstream", "redis", "metrics", "auth", "usage", "storage", "server", "idempotency", "jobs", "limits",
             "default_model", "models", "plans", "keys", "max_body_bytes", "max_edit_body_bytes"}


def _limits(raw: Any, key: str) -> dict[str, Any]:
    data = _mapping(raw, key)
    _check_known(data, set(LIMIT_NAMES), key)
    out: dict[str, Any] = {}
    for name, value in data.items():
        out[name] = check_number(value, f"{key}.{name}", integer=name != "usd_per_month", allow_none=True,
                            below=LIMIT_MAX)
    return out


def _model_list(raw: Any, key: str, enabled: Mapping[str, ModelConfig]) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(m, str) for m in raw):
        raise ConfigError(key, "must be a list of model names")
    for m in raw:
        if m not in enabled:
            raise ConfigError(key, f"model {m!r} is not enabled under 'models'")
    return tuple(raw)


def family_of(name: str) -> str | None:
    if name.startswith("gpt-image"):
        return "gpt-image"
    if name in ("dall-e-2", "dall-e-3"):
        return name
    return None


def _models(raw: Any) -> dict[str, ModelConfig]:
    if raw is None:
        return {name: ModelConfig(name=name, family=family_of(name)) for name in DEFAULT_MODELS}
    data = _mapping(raw, "models")
    if not data:
        raise ConfigError("models", "enables no model")
    out = {}
    price_keys = {"input_text_per_1m", "input_image_per_1m", "output_per_1m"}
    for name, spec in data.items():
        key = f"models.{name}"
        spec = _mapping(spec, key)
        _check_known(spec, price_keys | {"per_image", "family", "output_tokens", "input_image_tokens_per_image"},
                     key)
        family = spec.get("family", family_of(str(name)))
        if family is not None and family not in FAMILIES:
            raise ConfigError(f"{key}.family", f"must be one of {', '.join(FAMILIES)}, got {family!r}")
        prices = {p: check_number(spec[p], f"{key}.{p}") for p in price_keys if p in spec}
        per_image = None
        if "per_image" in spec:
            per_image = {str(k): check_number(v, f"{key}.per_image.{k}")
                         for k, v in _mapping(spec["per_image"], f"{key}.per_image").items()}
        tokens = None
        if "output_tokens" in spec:
            tokens = {str(k): check_number(v, f"{key}.output_tokens.{k}", integer=True)
                      for k, v in _mapping(spec["output_tokens"], f"{key}.output_tokens").items()}
        per_input_image = check_number(spec.get("input_image_tokens_per_image"),
                                       f"{key}.input_image_tokens_per_image", integer=True, allow_none=True)
        out[str(name)] = ModelConfig(name=str(name), family=family, per_image=per_image, output_tokens=tokens,
                                     input_image_tokens_per_image=per_input_image, **prices)
    return out


def _plans(raw: Any, models: Mapping[str, ModelConfig]) -> dict[str, Plan]:
    data = _mapping(raw, "plans")
    out = {}
    for name, spec in data.items():
        key = f"plans.{name}"
        spec = dict(_mapping(spec, key))
        allow = _model_list(spec.pop("models", None), f"{key}.models", models)
        out[str(name)] = Plan(name=str(name), limits=Limits(**_limits(spec, key)), models=allow)
    if "default" not in out:
        out["default"] = Plan(name="default", limits=Limits())
    return out


def _keys(raw: Any, plans: Mapping[str, Plan], models: Mapping[str, ModelConfig]) -> tuple[StaticKey, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("keys", "must be a list")
    out = []
    seen = set()
    for i, spec in enumerate(raw):
        key = f"keys[{i}]"
        spec = _mapping(spec, key)
        _check_known(spec, {"sha256", "user", "team", "plan", "limits", "models", "name"}, key)
        digest = spec.get("sha256")
        if not isinstance(digest, str) or not SHA256_RE.match(digest.lower()):
            raise ConfigError(f"{key}.sha256", "must be the 64-hex-digit SHA-256 of the key (never the key itself)")
        if digest.lower() in seen:
            raise ConfigError(f"{key}.sha256", "duplicates an earlier key")
        seen.add(digest.lower())
        user = spec.get("user")
        if not valid_name(user):
            raise ConfigError(f"{key}.user", "required: letters, digits and . _ @ - (at most 128)")
        team = spec.get("team")
        if team is not None and not valid_name(team):
            raise ConfigError(f"{key}.team", "letters, digits and . _ @ - (at most 128)")
        name = spec.get("name")
        if name is not None and (not isinstance(name, str) or not control_free(name)):
            raise ConfigError(f"{key}.name", "must be a string without control characters")
        plan = spec.get("plan", "default")
        if plan not in plans:
            raise ConfigError(f"{key}.plan", f"no plan named {plan!r} under 'plans'")
        out.append(StaticKey(sha256=digest.lower(), user=user, team=team, plan=plan,
                             limits=_limits(spec.get("limits"), f"{key}.limits"),
                             models=_model_list(spec.get("models"), f"{key}.models", models),
                             name=name))
    return tuple(out)


def _storage(raw: Any, env: Mapping[str, str]) -> StorageSettings:
    data = dict(_mapping(raw, "storage"))
    st = _section(StorageSettings, {k: v for k, v in data.items() if k != "endpoint_url"}, "storage")
    for key, reason in st.problems(url := env.get("STORAGE_ENDPOINT_URL") or data.get("endpoint_url")):
        raise ConfigError(f"storage.{key}", reason)
    return st.with_env(url, env)


def parse_settings(raw: Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from a parsed YAML mapping and the environment."""
    env = os.environ if env is None else env
    raw = _mapping(raw, "")
    _check_known(raw, _TOP_KEYS, "")
    upstream = _section(UpstreamSettings, raw.get("upstream"), "upstream", env)
    redis = _section(RedisSettings, raw.get("redis"), "redis", env)
    if redis.on_unavailable not in ("reject", "allow"):
        raise ConfigError("redis.on_unavailable", f"must be 'reject' or 'allow', got {redis.on_unavailable!r}")
    if not re.match(r"^https?://[^/\s]+", upstream.base_url):
        raise ConfigError("upstream.base_url", f"must be an http(s) URL, got {upstream.base_url!r}")
    if not redis.url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("redis.url", "must start with redis://, rediss:// or unix://")
    keys = tuple(k.strip() for k in env.get("TTAPI_API_KEY", "").split(",") if k.strip())
    upstream = replace(upstream, base_url=upstream.base_url.rstrip("/"), api_keys=keys)
    models = _models(raw.get("models"))
    default_model = raw.get("default_model", "gpt-image-1" if "gpt-image-1" in models else None)
    if default_model is not None and default_model not in models:
        raise ConfigError("default_model", f"{default_model!r} is not enabled under 'models'")
    plans = _plans(raw.get("plans"), models)
    usage = _section(UsageSettings, raw.get("usage"), "usage")
    if not usage.spool_path:
        usage = replace(usage, spool_path=default_spool_path(env))
    metrics = _section(MetricsSettings, raw.get("metrics"), "metrics")
    if metrics.flush_seconds > MAX_FLUSH_SECONDS:
        raise ConfigError("metrics.flush_seconds", f"must be <= {MAX_FLUSH_SECONDS}, got {metrics.flush_seconds!r}")
    max_body = check_number(raw.get("max_body_bytes", 1024 * 1024), "max_body_bytes", integer=True, minimum=1024)
    return Settings(
        upstream=upstream,
        redis=redis,
        metrics=metrics,
        auth=_section(AuthSettings, raw.get("auth"), "auth"),
        usage=usage,
        storage=_storage(raw.get("storage"), env),
        server=_section(ServerSettings, raw.get("server"), "server", env),
        idempotency=_section(IdempotencySettings, raw.get("idempotency"), "idempotency"),
        jobs=_section(JobsSettings, raw.get("jobs"), "jobs"),
        limits=_section(LeaseSettings, raw.get("limits"), "limits"),
        default_model=default_model,
        models=models,
        plans=plans,
        keys=_keys(raw.get("keys"), plans, models),
        max_body_bytes=max_body,
        max_edit_body_bytes=check_number(raw.get("max_edit_body_bytes", 64 * 1024 * 1024), "max_edit_body_bytes",
                                         integer=True, minimum=1024),
        admin_token=env.get("GATEWAY_ADMIN_TOKEN") or None,
        metrics_token=env.get("GATEWAY_METRICS_TOKEN") or None,
    )


def load_settings(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``path`` (or ``$GATEWAY_CONFIG``; none: built-in defaults) and the environment."""
    env = os.environ if env is None else env
    path = path or env.get("GATEWAY_CONFIG")
    if not path:
        return parse_settings({}, env)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from exc
    return parse_settings(raw, env)


def key_digest(key: str) -> str:
    """The SHA-256 hex digest under which a key is known."""
    return hashlib.sha256(key.encode()).hexdigest()
