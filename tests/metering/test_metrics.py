"""The metric series a running gateway shows before anything happened match what its code can emit."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

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
