"""``gateway keys create|list|revoke`` as an operator runs them: subprocesses against the test Redis."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from gateway.config import key_digest
from tests.support.procs import RedisServer, Service, free_port, start_gateway, wait_until

CONFIG: dict[str, Any] = {
    "default_model": "gpt-image-1",
    "redis": {"url": "redis://127.0.0.1:1/0", "key_prefix": "cli:"},  # REDIS_URL overrides the URL
    "plans": {"default": {}, "gold": {"requests_per_minute": 1000}},
    "auth": {"failed_attempts_per_minute": 10_000},
}


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = {"REDIS_URL": redis_server.url, "TTAPI_API_KEY": "tt-cli", "UPSTREAM_BASE_URL": "http://127.0.0.1:9",
           "GATEWAY_ADMIN_TOKEN": ""}
    svc = start_gateway(CONFIG, env, tmp=tmp_path_factory.mktemp("gw"))
    yield svc
    svc.stop()


def keys_cmd(redis_url: str, config: Path, *args: str, env: dict[str, str] | None = None,
             with_config: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gateway", "keys", *args]
    if with_config:
        command += ["--config", str(config)]
    full_env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url, **(env or {})}
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=full_env, cwd=root)


def models_status(gw: Service, key: str) -> int:
    response = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    return response.status_code


def test_create_list_revoke_and_the_key_works_at_a_running_gateway(gateway: Service, redis_url: str,
                                                                  config_path: Path) -> None:
    made = keys_cmd(redis_url, config_path, "create", "--user", "alice", "--team", "art", "--plan", "gold",
                    "--name", "nightly", "--limit", "requests_per_minute=5", "--limit", "usd_per_month=2.5",
                    "--limit", "images_per_day=null", "--model", "gpt-image-1", "--model", "dall-e-3",
                    "--expires-at", "2099-01-01T00:00:00Z", "--json")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    key = created["key"]
    assert {k: created[k] for k in ("user", "team", "plan", "limits", "models", "name", "expires_at")} == {
        "user": "alice", "team": "art", "plan": "gold", "name": "nightly",
        "expires_at": "2099-01-01T00:00:00Z",
        "limits": {"requests_per_minute": 5, "usd_per_month": 2.5, "images_per_day": None},
        "models": ["gpt-image-1", "dall-e-3"]}

    response = httpx.get(gateway.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    assert sorted(m["id"] for m in response.json()["data"]) == ["dall-e-3", "gpt-image-1"]

    listed = keys_cmd(redis_url, config_path, "list", "--user", "alice", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {"data": [{k: v for k, v in created.items() if k != "key"}]}
    table = keys_cmd(redis_url, config_path, "list", "--user", "alice")
    assert created["id"] in table.stdout and "nightly" in table.stdout and key not in table.stdout

    revoked = keys_cmd(redis_url, config_path, "revoke", created["id"])
    assert revoked.returncode == 0 and created["id"] in revoked.stdout
    wait_until(lambda: models_status(gateway, key) == 401, "revoked key refused", timeout=5.0)  # SPEC §6
    after = keys_cmd(redis_url, config_path, "list", "--user", "alice", "--json")
    assert json.loads(after.stdout) == {"data": []}


def test_create_prints_the_key_once_and_stores_only_its_digest(redis_url: str, config_path: Path) -> None:
    made = keys_cmd(redis_url, config_path, "create", "--user", "bob")
    assert made.returncode == 0, made.stderr
    lines = dict(line.split(":", 1) for line in made.stdout.splitlines())
    key, key_id = lines["key"].strip(), lines["id"].strip()
    assert made.stdout.count(key) == 1 and key not in made.stderr and "only" in made.stderr
    client = redis.Redis.from_url(redis_url)
    stored = client.hgetall(f"cli:key:{key_digest(key)}")
    assert json.loads(stored[b"id"]) == key_id and json.loads(stored[b"user"]) == "bob"
    assert client.smembers("cli:users") == {b"bob"}
    for name in client.scan_iter(match="*"):
        assert name.startswith(b"cli:")  # the config's key_prefix
        assert key.encode() not in name


def test_create_with_a_webhook_prints_its_secret_once_and_refuses_loopback(redis_url: str, config_path: Path) -> None:
    made = keys_cmd(redis_url, config_path, "create", "--user", "bob", "--webhook-url", "https://hooks.example/j")
    assert made.returncode == 0, made.stderr
    secret = dict(line.split(": ", 1) for line in made.stdout.splitlines())["webhook_secret"]
    assert secret.startswith("whsec_") and made.stdout.count(secret) == 1
    listed = keys_cmd(redis_url, config_path, "list", "--user", "bob", "--json")
    assert json.loads(listed.stdout)["data"][0]["webhook_url"] == "https://hooks.example/j"
    assert secret not in listed.stdout
    refused = keys_cmd(redis_url, config_path, "create", "--user", "bob", "--webhook-url", "http://127.0.0.1/h")
    assert refused.returncode == 2 and "webhook_url" in refused.stderr


def test_config_comes_from_gateway_config_when_no_flag(redis_url: str, config_path: Path) -> None:
    made = keys_cmd(redis_url, config_path, "create", "--user", "carol", "--json",
                    env={"GATEWAY_CONFIG": str(config_path)}, with_config=False)
    assert made.returncode == 0, made.stderr
    assert redis.Redis.from_url(redis_url).exists(f"cli:key:{key_digest(json.loads(made.stdout)['key'])}")


@pytest.mark.parametrize(("args", "needle"), [
    (["--limit", "requests_per_hour=5"], "limits.requests_per_hour"),
    (["--limit", "requests_per_minute=many"], "limits.requests_per_minute"),
    (["--model", "midjourney"], "models"),
    (["--plan", "platinum"], "plan"),
    (["--expires-at", "2001-01-01T00:00:00Z"], "expires_at"),
])
def test_bad_create_arguments_exit_2_and_store_nothing(redis_url: str, config_path: Path, args: list[str],
                                                       needle: str) -> None:
    made = keys_cmd(redis_url, config_path, "create", "--user", "alice", *args)
    assert made.returncode == 2 and needle in made.stderr and "Traceback" not in made.stderr
    assert made.stdout == ""
    assert list(redis.Redis.from_url(redis_url).scan_iter(match="*")) == []


def test_revoking_an_unknown_id_exits_1(redis_url: str, config_path: Path) -> None:
    result = keys_cmd(redis_url, config_path, "revoke", "key_00000000")
    assert result.returncode == 1 and "no key" in result.stderr


def test_unreachable_redis_exits_1_without_a_traceback(config_path: Path) -> None:
    result = keys_cmd(f"redis://127.0.0.1:{free_port()}/0", config_path, "list", "--user", "alice")
    assert result.returncode == 1 and "unavailable" in result.stderr and "Traceback" not in result.stderr


def test_bad_config_exits_2(redis_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("redis: {key_prefix: 5}\n")
    result = keys_cmd(redis_url, bad, "list", "--user", "alice")
    assert result.returncode == 2 and "redis.key_prefix" in result.stderr


def test_list_escapes_control_characters_in_a_stored_name(redis_url: str, config_path: Path) -> None:
    made = keys_cmd(redis_url, config_path, "create", "--user", "mallory", "--json")
    key_id = json.loads(made.stdout)["id"]
    # A record written before names were checked, or by hand: the listing must not replay it raw.
    client = redis.Redis.from_url(redis_url)
    digest = client.get(f"cli:keyid:{key_id}").decode()
    client.hset(f"cli:key:{digest}", "name", json.dumps("\x1b]0;pwned\x07\x1b[2J\nfake row"))
    listed = keys_cmd(redis_url, config_path, "list", "--user", "mallory")
    assert listed.returncode == 0, listed.stderr
    assert "\x1b" not in listed.stdout and "\x07" not in listed.stdout
    assert len(listed.stdout.splitlines()) == 2  # header and one row: the newline did not split it
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\nfake row" in listed.stdout


@pytest.mark.parametrize("name", ["\x1b[31mred", "two\nlines", "bidi\u202eevil"])
def test_create_refuses_a_name_with_control_characters(redis_url: str, config_path: Path, name: str) -> None:
    made = keys_cmd(redis_url, config_path, "create", "--user", "bob", "--name", name)
    assert made.returncode == 2 and "name" in made.stderr
    assert redis.Redis.from_url(redis_url).keys("cli:key:*") == []
