"""Probe: more ways through a one-slot intake (idempotency, async jobs, edits) must each leave it."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.http.test_edits import picture
from tests.pipeline.test_gateway import KEY, env, post
from tests.pipeline.test_intake import one_at_a_time
from tests.pipeline.test_overload import metric
from tests.support.procs import RedisServer, Service, start_gateway

AUTH = {"authorization": f"Bearer {KEY}"}


def test_other_ways_through_keep_no_slot(fake: Service, redis_url: str, tmp_path: Path) -> None:
    gw = start_gateway(one_at_a_time({"requests_per_minute": 9}), env(fake, redis_url), tmp=tmp_path)
    url = gw.url + "/v1/images/generations"
    body = {"prompt": "x", "quality": "low"}
    try:
        first = httpx.post(url, json=body, headers={**AUTH, "idempotency-key": "k1"}, timeout=60)
        replay = httpx.post(url, json=body, headers={**AUTH, "idempotency-key": "k1"}, timeout=60)
        reused = httpx.post(url, json={**body, "prompt": "y"}, headers={**AUTH, "idempotency-key": "k1"},
                            timeout=60)  # refused before the intake
        assert (first.status_code, replay.status_code) == (200, 200) and 400 <= reused.status_code < 500
        job = httpx.post(url, json=body, headers={**AUTH, "prefer": "respond-async"}, timeout=60)
        assert job.status_code != 503  # 400 here: no job store configured; the code path skips the intake anyway
        edit = httpx.post(gw.url + "/v1/images/edits", headers=AUTH, timeout=60,
                          files=[("prompt", (None, "p")), ("model", (None, "gpt-image-1")),
                                 ("image", ("a.png", picture("PNG"), "image/png"))])
        assert edit.status_code == 200, edit.text
        codes = [httpx.post(url, json=body, headers=AUTH, timeout=60).status_code for _ in range(8)]
        assert 503 not in codes and codes[-1] == 429, codes  # the last refused inside the intake
        assert metric(gw.url, 'gateway_admission_shed_total{reason="deadline"}') == 0
    finally:
        gw.stop()


def test_redis_down_with_policy_allow_keeps_no_slot(fake: Service, tmp_path: Path) -> None:
    redis = RedisServer().start()
    gw = start_gateway(one_at_a_time({"requests_per_minute": 1}, on_unavailable="allow"), env(fake, redis.url),
                       tmp=tmp_path)
    try:
        redis.stop()
        assert [post(gw.url).status_code for _ in range(3)] == [200, 200, 200]  # one slot: each left it
    finally:
        gw.stop()
        redis.cleanup()
