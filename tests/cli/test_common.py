"""What the ``keys``, ``usage`` and ``jobs`` groups share: ``command_group`` and ``run_against_redis``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from gateway.cli.common import command_group, run_against_redis
from gateway.config import Settings
from gateway.errors import InvalidRequest, NotFound
from gateway.redisdb.keys import RedisKeys
from tests.support.procs import free_port


def parser_with_group() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway")
    add = command_group(parser.add_subparsers(dest="command", required=True), "things", "manage things")
    add("show", "show one thing", lambda args: 0).add_argument("id")
    return parser


def test_a_group_command_takes_config_and_dispatches_to_its_function() -> None:
    args = parser_with_group().parse_args(["things", "show", "t1", "--config", "a.yaml"])
    assert (args.id, args.config, args.things_command, args.func(args)) == ("t1", "a.yaml", "show", 0)
    assert parser_with_group().parse_args(["things", "show", "t1"]).config is None


def test_a_group_without_its_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parser_with_group().parse_args(["things"])
    assert exited.value.code == 2 and "things_command" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def no_redis_url_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)  # REDIS_URL would override the config's URL


def config_file(tmp_path: Path, url: str) -> argparse.Namespace:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"redis": {"url": url, "key_prefix": "clitest:"}}))
    return argparse.Namespace(config=str(path))


def test_the_action_gets_the_configured_redis_and_key_prefix_and_its_status_is_the_exit_status(
        redis_url: str, tmp_path: Path) -> None:
    async def action(settings: Settings, client: Any, keys: RedisKeys) -> int:
        await client.set(keys.user("alice", "probe"), settings.redis.key_prefix)
        return 1

    assert run_against_redis(config_file(tmp_path, redis_url), action) == 1
    assert redis.Redis.from_url(redis_url).get("clitest:{u:alice}:probe") == b"clitest:"


@pytest.mark.parametrize(("error", "status"), [
    (InvalidRequest("Invalid 'period'.", param="period"), 2),
    (NotFound("No such thing."), 1),
])
def test_gateway_errors_become_a_message_and_an_exit_status(redis_url: str, tmp_path: Path, error: Exception,
                                                            status: int, capsys: pytest.CaptureFixture[str]) -> None:
    async def action(settings: Settings, client: Any, keys: RedisKeys) -> int:
        raise error

    assert run_against_redis(config_file(tmp_path, redis_url), action) == status
    assert capsys.readouterr().err == f"error: {error.args[0]}\n"


def test_unreachable_redis_exits_1_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def action(settings: Settings, client: Any, keys: RedisKeys) -> int:
        await client.ping()
        return 0

    assert run_against_redis(config_file(tmp_path, f"redis://127.0.0.1:{free_port()}/0"), action) == 1
    assert capsys.readouterr().err == "error: Redis unavailable (ConnectionError)\n"


def test_a_bad_config_exits_2_before_the_action_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("redis: {key_prefix: 5}\n")
    ran = []

    async def action(settings: Settings, client: Any, keys: RedisKeys) -> int:
        ran.append(True)
        return 0

    assert run_against_redis(argparse.Namespace(config=str(path)), action) == 2
    assert ran == [] and "redis.key_prefix" in capsys.readouterr().err
