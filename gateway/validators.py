"""Rules for values operators give (config file, admin API, CLI): names and numbers.

Users and teams end up in Redis keys (inside a Cluster hash tag), metric labels and records
split on newlines, so they are matched whole (``valid_name``), never with ``re.match``:
``$`` matches before a final newline, and ``"carol\\n"`` would pass.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any, TypeGuard

# Limits are summed in Redis integers (usd as micro-dollars): past this they would overflow.
LIMIT_MAX = 10**12
NAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,128}")  # SPEC §4; "{", "}" and ":" stay out of the hash tag


def valid_name(value: Any) -> TypeGuard[str]:
    """A user or team name: the whole string matches ``NAME_RE``."""
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def control_free(value: str) -> bool:
    """No control, format or line-separator characters (they would reach terminals and logs raw)."""
    return not any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") for c in value)


class ConfigError(ValueError):
    """A configuration key is missing, mistyped or out of range."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"config key '{key}': {reason}")
        self.key = key
        self.reason = reason


def check_number(value: Any, key: str, *, integer: bool = False, minimum: float = 0, allow_none: bool = False,
                 exclusive: bool = False, below: float | None = None) -> Any:
    """``value`` if it is a finite number within the bounds (or None when allowed); else ConfigError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(key, f"must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value!r}")
    if value < minimum or (exclusive and value == minimum):
        raise ConfigError(key, f"must be {'>' if exclusive else '>='} {minimum}, got {value!r}")
    if below is not None and value >= below:
        raise ConfigError(key, f"must be below {below:.0e}, got {value!r}")
    return value
