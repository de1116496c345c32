"""``gateway serve``: config errors at start, metrics on a separate port, summed over workers."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.procs import free_port, start_fake_upstream, start_gateway, wait_until

KEY = "sk-igw-test_server-cccccccccccccccc"


def test_bad_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("redis:\n  on_unavailable: maybe\n")
    run = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port",
                          str(free_port())], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "redis.on_unavailable" in run.stderr and "'reject' or 'allow'" in run.stderr
    check = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)], capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 2 and "redis.on_unavailable" in check.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_on_a_separate_port_sum_all_workers(workers: int, redis_url: str, tmp_path: Path) -> None:
    fake = start_fake_upstream("tt-server")
    port = free_port()
    cfg = {"metrics": {"port": port}, "plans": {"default": {}},
           "keys": [{"user": "dora", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}]}
    env = {"TTAPI_API_KEY": "tt-server", "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_url}
    gw = start_gateway(cfg, {**env, "PROMETHEUS_MULTIPROC_DIR": None}, workers=workers, tmp=tmp_path)
    try:
        for _ in range(6):
            r = httpx.post(gw.url + "/v1/images/generations", json={"prompt": "x", "quality": "low"},
                           headers={"authorization": f"Bearer {KEY}"})
            assert r.status_code == 200
        line = 'gateway_requests_total{model="gpt-image-1",route="/v1/images/generations",status="200"} 6.0'
        wait_until(lambda: line in httpx.get(f"http://127.0.0.1:{port}/metrics").text, "separate metrics port")
        assert line in httpx.get(gw.url + "/metrics").text
        assert 'gateway_usage_tokens_total{kind="output",model="gpt-image-1",team="",user="dora"} 1632.0' \
            in httpx.get(gw.url + "/metrics").text
    finally:
        gw.stop()
        fake.stop()
