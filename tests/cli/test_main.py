"""The ``gateway`` command's conventions: every command that reads the config takes ``--config``;
every command against Redis says so, without a traceback, when Redis is down."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import free_port


def gateway(*args: str, redis_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_CONFIG", "TTAPI_API_KEY", "REDIS_URL")}
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60,
                          env=env)


@pytest.fixture
def configs(tmp_path: Path) -> tuple[Path, Path]:
    good = tmp_path / "good.yaml"
    good.write_text("plans:\n  pro: {requests_per_minute: 5}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("plans:\n  pro: {requests_per_minut: 5}\n")
    return good, bad


@pytest.mark.parametrize("form", ["positional", "option"])
def test_check_config_takes_the_file_as_path_or_as_config(form: str, configs: tuple[Path, Path]) -> None:
    good, bad = configs
    for path, status in ((good, 0), (bad, 2)):
        args = [str(path)] if form == "positional" else ["--config", str(path)]
        run = gateway("check-config", *args)
        assert run.returncode == status, run.stderr
        if status:
            assert "plans.pro.requests_per_minut" in run.stderr and "unknown key" in run.stderr
        else:
            assert run.stdout.startswith("ok: ") and "2 plans" in run.stdout


def test_check_config_refuses_two_different_files(configs: tuple[Path, Path]) -> None:
    good, bad = configs
    run = gateway("check-config", str(good), "--config", str(bad))
    assert run.returncode == 2 and "once" in run.stderr
    assert gateway("check-config", str(good), "--config", str(good)).returncode == 0



@pytest.mark.parametrize("command", [
    ["keys", "list", "--user", "alice"],
    ["usage", "totals", "--user", "alice", "--period", "2026-11"],
    ["jobs", "list", "--user", "alice"],
    ["jobs", "show", "imgjob_x"],
])
def test_commands_against_redis_exit_1_without_a_traceback_when_it_is_down(command: list[str],
                                                                          configs: tuple[Path, Path]) -> None:
    good, _ = configs
    run = gateway(*command, "--config", str(good), redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert run.returncode == 1 and "unavailable" in run.stderr and "Traceback" not in run.stderr
