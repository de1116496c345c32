"""The metric series a running gateway shows before anything happened match what its code can emit;
the workers' sum leaves out the live gauges of a worker that was killed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.metering import metrics
from tests.support import procs

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"
# redis_errors.labels("op") and KeyStore's `with self._redis_errors("op")`: every place an op is emitted.
_EMITS = re.compile(r'(?:redis_errors\.labels|_redis_errors)\(\s*"([a-z_]+)"\s*\)')


def emitted_redis_ops() -> set[str]:
    return {op for path in GATEWAY.rglob("*.py") for op in _EMITS.findall(path.read_text())}


def test_redis_error_series_are_exactly_the_emitted_ops(redis_url: str, tmp_path: Path) -> None:
    ops = emitted_redis_ops()
    assert {"admit", "settle", "auth_guard", "key_lookup", "usage"} <= ops  # the pattern still finds them
    env = {"REDIS_URL": redis_url, "TTAPI_API_KEY": "tt-x", "UPSTREAM_BASE_URL": "http://127.0.0.1:9"}
    with procs.running(procs.start_gateway({}, env, tmp=tmp_path)) as gw:
        text = httpx.get(gw.url + "/metrics").text
    scraped = {sample.labels["op"] for family in text_string_to_metric_families(text)
               if family.name == "gateway_redis_errors" for sample in family.samples}
    assert scraped == ops


_WORKER = """
import os, sys, time
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from prometheus_client import CollectorRegistry, Gauge
from gateway.metering import buffered_values, metrics
gauge = Gauge("t_inflight", "In flight.", ("route",), registry=CollectorRegistry(), multiprocess_mode="livesum")
gauge.labels("/r").inc(int(sys.argv[2]))
buffered_values.flush()
print("ready", flush=True)
time.sleep(120)
"""


def test_a_killed_workers_live_gauges_leave_the_sum_and_a_live_workers_stay(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path), str(n)], stdout=subprocess.PIPE,
                                text=True) for n in (2, 3)]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline() == "ready\n"
        survivor, killed = workers
        killed.kill()  # SIGKILL: no exit handler runs; uvicorn's supervisor reaps it, as wait() does here
        killed.wait()
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        body, _ = metrics.render(CollectorRegistry())
        (family,) = [f for f in text_string_to_metric_families(body.decode()) if f.name == "t_inflight"]
        assert [(s.labels["route"], s.value) for s in family.samples] == [("/r", 2.0)]
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"gauge_livesum_{survivor.pid}.db"]
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
