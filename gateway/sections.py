"""Flat config sections: a mapping checked against a settings dataclass, with environment overrides.

Parsed for gateway/config.py (which has no room left); kept free of imports from the rest of the
gateway but validators and the storage settings, so config.py can import it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

from gateway.imagestore.settings import StorageSettings
from gateway.validators import ConfigError, check_number


def mapping(value: Any, key: str) -> Mapping[str, Any]:
    """``value`` as a mapping (None: empty), or a ConfigError naming ``key``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a mapping, got {type(value).__name__}")
    return value


def check_known(section: Mapping[str, Any], allowed: set[str], key: str) -> None:
    """Raise a ConfigError for the first name in ``section`` not in ``allowed``."""
    for name in section:
        if name not in allowed:
            where = f"{key}.{name}" if key else str(name)
            raise ConfigError(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")


_NUMBER_RE = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")  # an override that reads as a number is one
ENV_OVERRIDES = {"upstream": {"base_url": "UPSTREAM_BASE_URL"}, "redis": {"url": "REDIS_URL"},
                 "server": {"workers": "GATEWAY_WORKERS", "grace_seconds": "GATEWAY_GRACE_SECONDS"}}
_POSITIVE = {"timeout_seconds", "connect_timeout_seconds", "max_connections", "settle_queue_size",
             "pipeline_connections", "health_interval_seconds", "health_timeout_seconds", "health_failures",
             "admission_queue", "admission_wait_seconds", "workers",
             "max_header_bytes", "header_timeout_seconds", "body_timeout_seconds", "body_min_bytes_per_second",
             "keep_alive_seconds", "ttl_seconds", "concurrency",
             "visibility_timeout_seconds", "poll_seconds", "max_response_bytes", "send_timeout_seconds",
             "sweep_interval_seconds", "intake_concurrency", "flush_seconds"}


def section(cls: type, raw: Any, key: str, env: Mapping[str, str] | None = None) -> Any:
    """A flat settings dataclass from a mapping and ``ENV_OVERRIDES`` (errors name the variable), checked."""
    data = dict(mapping(raw, key))
    defaults = cls()
    check_known(data, {f.name for f in fields(cls)} - {"api_keys", *StorageSettings.FROM_ENV}, key)
    where = {name: f"{key}.{name}" for name in data}
    for name, var in ENV_OVERRIDES.get(key, {}).items():
        if env and (text := env.get(var, "").strip()):
            data[name], where[name] = json.loads(text) if _NUMBER_RE.fullmatch(text) else text, var
    values: dict[str, Any] = {}
    for name, value in data.items():
        default = getattr(defaults, name)
        full = where[name]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(full, f"must be true or false, got {value!r}")
        elif isinstance(default, int | float) or default is None:
            value = check_number(value, full, integer=isinstance(default, int) or default is None,
                            allow_none=default is None, exclusive=name in _POSITIVE)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(full, f"must be a string, got {value!r}")
        values[name] = value
    return replace(defaults, **values)
