"""What every `gateway` subcommand shares: ``--config``, a command group, a run against Redis, exit statuses.

Exit status of a command run with ``run_against_redis``: 0 done, 1 Redis unavailable or another
gateway error (each says which), 2 bad config or arguments. A command may return 1 itself.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.config import ConfigError, Settings, load_settings
from gateway.errors import GatewayError, InvalidRequest
from gateway.redisdb.client import REDIS_ERRORS, open_redis
from gateway.redisdb.keys import RedisKeys

Handler = Callable[[argparse.Namespace], int]
AddCommand = Callable[[str, str, Handler], argparse.ArgumentParser]
# An action run against Redis: the settings of --config, an open client, the key builder; the exit status.
RedisAction = Callable[[Settings, Any, RedisKeys], Awaitable[int]]


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``--config``, the same on every command that reads the config."""
    parser.add_argument("--config", default=None, help="YAML config file (default: $GATEWAY_CONFIG)")


def command_group(subparsers: Any, name: str, help_text: str) -> AddCommand:
    """Add ``gateway NAME`` with its own subcommands; returns ``add(command, help, func)``.

    ``add`` adds ``gateway NAME COMMAND`` taking ``--config`` and dispatching to ``func(args)``,
    and returns its parser for the command's own arguments.
    """
    group = subparsers.add_parser(name, help=help_text)
    commands = group.add_subparsers(dest=f"{name}_command", required=True)

    def add(command: str, command_help: str, func: Handler) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(command, help=command_help)
        add_config_option(parser)
        parser.set_defaults(func=func)
        return parser

    return add


def settings_or_report(path: str | None) -> Settings | None:
    """Settings for a CLI command, or None after printing the config error (exit status 2)."""
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def run_against_redis(args: argparse.Namespace, action: RedisAction) -> int:
    """``action`` with the settings of ``args.config`` and a Redis client closed after it; the exit status."""
    settings = settings_or_report(args.config)
    if settings is None:
        return 2

    async def main() -> int:
        client = open_redis(settings.redis)
        try:
            return await action(settings, client, RedisKeys(settings.redis.key_prefix))
        finally:
            await client.aclose()

    try:
        return int(asyncio.run(main()))
    except InvalidRequest as exc:
        return _report(exc.message, 2)
    except GatewayError as exc:
        return _report(exc.message, 1)
    except REDIS_ERRORS as exc:
        return _report(f"Redis unavailable ({type(exc).__name__})", 1)


def _report(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status
