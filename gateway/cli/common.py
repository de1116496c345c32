"""What every `gateway` subcommand shares."""

from __future__ import annotations

import sys

from gateway.config import ConfigError, Settings, load_settings


def settings_or_report(path: str | None) -> Settings | None:
    """Settings for a CLI command, or None after printing the config error (exit status 2)."""
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
