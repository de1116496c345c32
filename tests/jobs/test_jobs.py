"""Asynchronous jobs through real processes: gateway, fake upstream, redis-server, SeaweedFS.

A user's view: submit with ``Prefer: respond-async``, poll ``GET /v1/images/jobs/{id}``, download.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from typing import Any

import httpx
import redis

from tests.jobs.conftest import UPSTREAM_KEY
from tests.support.procs import Service, start_gateway, wait_until
from tests.support.seaweed import S3Store

ALICE = "sk-igw-test_jobs-aaaaaaaaaaaaaaaaaaaa"
BOB = "sk-igw-test_jobs-bbbbbbbbbbbbbbbbbbbb"

PNG = b"\x89PNG\r\n\x1a\n"


def config(plan: dict[str, Any], **jobs: Any) -> dict[str, Any]:
    keys = [{"user": user, "plan": "p", "sha256": hashlib.sha256(k.encode()).hexdigest()}
            for user, k in (("alice", ALICE), ("bob", BOB))]
    return {"plans": {"p": plan}, "keys": keys, "jobs": {"visibility_timeout_seconds": 2, **jobs}}






def env(fake: Service, redis_url: str, store: S3Store | None) -> dict[str, str]:
    return {"TTAPI_API_KEY": UPSTREAM_KEY, "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_url,
            **(store.env() if store else {})}


def gateway(upstream: Service, redis_url: str, s3_store: S3Store | None, plan: dict[str, Any],
            **jobs: Any) -> Service:
    cfg = config(plan, **jobs)
    if s3_store is not None:
        cfg["storage"] = {"bucket": s3_store.bucket}
    return start_gateway(cfg, env(upstream, redis_url, s3_store))


def submit(gw: Service, key: str = ALICE, **body: Any) -> httpx.Response:
    return httpx.post(gw.url + "/v1/images/generations", json={"prompt": "a cat", "quality": "low", **body},
                      headers={"authorization": f"Bearer {key}", "prefer": "respond-async"}, timeout=30)


def get_job(gw: Service, job_id: str, key: str = ALICE) -> httpx.Response:
    return httpx.get(f"{gw.url}/v1/images/jobs/{job_id}", headers={"authorization": f"Bearer {key}"}, timeout=30)


def finished(gw: Service, job_id: str, key: str = ALICE, timeout: float = 60) -> dict[str, Any]:
    """Poll the job until it succeeded or failed (what a client does)."""
    out: dict[str, Any] = {}

    def done() -> bool:
        out.update(get_job(gw, job_id, key).json())
        return out["status"] in ("succeeded", "failed")

    wait_until(done, f"job {job_id}", timeout=timeout)
    return out


def records(redis_url: str, user: str) -> list[dict[str, str]]:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    return [fields for _, fields in r.xrange(f"igw:{{u:{user}}}:ledger")]


def test_lifecycle_202_poll_download_other_user_404_one_record(upstream: Service, redis_url: str,
                                                               s3_store: S3Store) -> None:
    gw = gateway(upstream, redis_url, s3_store, {"requests_per_minute": 60})
    try:
        answer = submit(gw)
        assert answer.status_code == 202, answer.text
        job = answer.json()
        assert job["object"] == "image.job" and job["status"] == "queued" and job["id"].startswith("imgjob_")
        assert answer.headers["location"] == f"/v1/images/jobs/{job['id']}"
        assert isinstance(job["created_at"], int)
        done = finished(gw, job["id"])
        assert done["status"] == "succeeded", done
        assert done["error"] is None and done["completed_at"] >= done["created_at"]
        url = done["result"]["data"][0]["url"]
        assert "b64_json" not in done["result"]["data"][0]
        image = httpx.get(url, timeout=30)
        assert image.status_code == 200 and image.content.startswith(PNG)
        other = get_job(gw, job["id"], key=BOB)
        assert other.status_code == 404 and other.json()["error"]["message"]
        assert get_job(gw, "imgjob_nope").status_code == 404
        mine = [r for r in records(redis_url, "alice") if r["request_id"] == job["id"]]
        assert len(mine) == 1 and int(mine[0]["images"]) == 1
        assert httpx.get(upstream.url + "/_fake/stats").json()["requests"] == 1
    finally:
        gw.stop()


def test_without_a_store_a_job_is_refused_with_400(upstream: Service, redis_url: str) -> None:
    gw = gateway(upstream, redis_url, None, {})
    try:
        answer = submit(gw)
        assert answer.status_code == 400 and "image store" in answer.json()["error"]["message"]
    finally:
        gw.stop()


def test_quota_refusal_is_a_429_at_submission(upstream: Service, redis_url: str, s3_store: S3Store) -> None:
    gw = gateway(upstream, redis_url, s3_store, {"images_per_day": 2, "max_concurrent_requests": 1})
    try:
        ids = [submit(gw) for _ in range(2)]
        assert [a.status_code for a in ids] == [202, 202]  # concurrency 1 does not refuse: it paces
        third = submit(gw)
        assert third.status_code == 429 and third.json()["error"]["code"] == "insufficient_quota"
        assert third.headers["x-should-retry"] == "false"
        for a in ids:
            assert finished(gw, a.json()["id"])["status"] == "succeeded"
    finally:
        gw.stop()


def test_pacing_six_jobs_with_concurrency_two(upstream: Service, redis_url: str, s3_store: S3Store) -> None:
    gw = gateway(upstream, redis_url, s3_store, {"max_concurrent_requests": 2})
    try:
        ids = [submit(gw, fake={"latency": 0.5}).json()["id"] for _ in range(6)]
        assert all(finished(gw, i)["status"] == "succeeded" for i in ids)
        stats = httpx.get(upstream.url + "/_fake/stats").json()
        assert stats["requests"] == 6 and stats["max_in_flight"] == 2
    finally:
        gw.stop()


def test_fairness_one_users_fifty_jobs_do_not_starve_anothers_one(upstream: Service, redis_url: str,
                                                                   s3_store: S3Store) -> None:
    gw = gateway(upstream, redis_url, s3_store, {"max_concurrent_requests": 2})
    try:
        alice = [submit(gw, fake={"latency": 1}).json()["id"] for _ in range(50)]
        sent_before = httpx.get(upstream.url + "/_fake/stats").json()["requests"]
        bob = submit(gw, key=BOB, prompt="bob's only job").json()["id"]
        assert finished(gw, bob, key=BOB)["status"] == "succeeded"
        order = [e["body"]["prompt"] for e in httpx.get(upstream.url + "/_fake/stats").json()["recent"]
                 if e["body"]]
        # Alice's jobs go 2 at a time, 1 s each: bob's starts in the runner's next round, not after her
        # remaining ones (at most her 2 slots can free and refill before that round).
        assert order.index("bob's only job") - sent_before <= 2, (sent_before, order)
        assert sent_before < 40
        assert get_job(gw, alice[-1]).json()["status"] in ("queued", "in_progress")
    finally:
        gw.stop()


def test_cancel_a_queued_job(upstream: Service, redis_url: str, s3_store: S3Store) -> None:
    gw = gateway(upstream, redis_url, s3_store, {"max_concurrent_requests": 1})
    try:
        ids = [submit(gw, fake={"latency": 1}).json()["id"] for _ in range(3)]
        cancelled = httpx.delete(f"{gw.url}/v1/images/jobs/{ids[2]}", headers={"authorization": f"Bearer {ALICE}"})
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "failed" and cancelled.json()["error"]["code"] == "job_cancelled"
        assert finished(gw, ids[1])["status"] == "succeeded"
        again = httpx.delete(f"{gw.url}/v1/images/jobs/{ids[1]}", headers={"authorization": f"Bearer {ALICE}"})
        assert again.status_code == 400
        assert httpx.get(upstream.url + "/_fake/stats").json()["requests"] == 2
    finally:
        gw.stop()


def killed_mid_batch(upstream: Service, redis_url: str, s3_store: S3Store, slots: int) -> tuple[list[str], Service]:
    """Five jobs on a gateway SIGKILLed while ``slots`` of them are upstream; the jobs and a new gateway."""
    plan = {"max_concurrent_requests": slots}
    gw = gateway(upstream, redis_url, s3_store, plan)
    ids = [submit(gw, fake={"latency": 3}).json()["id"] for _ in range(5)]
    wait_until(lambda: httpx.get(upstream.url + "/_fake/stats").json()["in_flight"] == min(slots, 5), "jobs upstream")
    gw.stop(signal.SIGKILL)
    return ids, gateway(upstream, redis_url, s3_store, plan)


def assert_each_succeeded_billed_once(gw: Service, redis_url: str, ids: list[str]) -> None:
    for i in ids:
        assert finished(gw, i, timeout=90)["status"] == "succeeded"
    for i in ids:
        assert len([r for r in records(redis_url, "alice") if r["request_id"] == i]) == 1


def test_sigkill_with_five_jobs_in_flight_loses_none(upstream: Service, redis_url: str, s3_store: S3Store) -> None:
    ids, gw2 = killed_mid_batch(upstream, redis_url, s3_store, slots=10)
    try:
        assert_each_succeeded_billed_once(gw2, redis_url, ids)
        # Each job went upstream twice (killed mid-call, then re-run), both times with its own Idempotency-Key.
        sent = [e["headers"]["idempotency-key"] for e in httpx.get(upstream.url + "/_fake/stats").json()["recent"]]
        assert len(sent) == 10 and len(set(sent)) == 5 and all(sent.count(k) == 2 for k in sent)
    finally:
        gw2.stop()


def test_sigkill_holding_every_slot_with_more_jobs_queued_loses_no_time(upstream: Service, redis_url: str,
                                                                        s3_store: S3Store) -> None:
    """The dead worker's jobs hold all of the user's slots (their leases last upstream.timeout_seconds + 60 s):
    they are taken over after the visibility timeout, ahead of the user's queued jobs, which would wait for
    those slots. ``finished`` waits 90 s: well before the dead leases expire (660 s)."""
    ids, gw2 = killed_mid_batch(upstream, redis_url, s3_store, slots=2)
    try:
        assert_each_succeeded_billed_once(gw2, redis_url, ids)
    finally:
        gw2.stop()


def test_cli_list_show_cancel(upstream: Service, redis_url: str, s3_store: S3Store) -> None:
    gw = gateway(upstream, redis_url, s3_store, {"max_concurrent_requests": 1})
    try:
        # The first job holds the user's only slot for 20 s: the others stay queued meanwhile.
        ids = [submit(gw, fake={"latency": 20}).json()["id"]] + [submit(gw).json()["id"] for _ in range(2)]
        wait_until(lambda: get_job(gw, ids[0]).json()["status"] == "in_progress", "first job started")

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "gateway", "jobs", *args], capture_output=True, text=True,
                                  env={**os.environ, "REDIS_URL": redis_url}, timeout=60)

        listed = cli("list", "--user", "alice", "--json")
        assert listed.returncode == 0 and {j["id"] for j in json.loads(listed.stdout)["data"]} == set(ids)
        shown = cli("show", ids[2])
        assert shown.returncode == 0 and json.loads(shown.stdout)["user"] == "alice"
        assert json.loads(shown.stdout)["status"] == "queued"
        assert cli("cancel", ids[2]).returncode == 0
        assert get_job(gw, ids[2]).json()["error"]["code"] == "job_cancelled"
        assert cli("cancel", ids[0]).returncode == 1  # started: no longer cancellable
        # One job still waits (ids[1]): the queue gauges say so.
        wait_until(lambda: "gateway_jobs_queued 1.0" in httpx.get(gw.url + "/metrics").text, "queue gauge")
        assert 'gateway_jobs_total{status="submitted"} 3.0' in httpx.get(gw.url + "/metrics").text
        assert cli("show", "imgjob_nope").returncode == 1
    finally:
        gw.stop(signal.SIGKILL)  # not worth waiting for the 20 s job


def test_cli_list_refuses_a_limit_below_one(redis_url: str) -> None:
    # Read as a Redis range end, 0 listed every job and -1 all but the oldest.
    for limit in ("0", "-1"):
        listed = subprocess.run([sys.executable, "-m", "gateway", "jobs", "list", "--user", "alice", "--limit", limit],
                                capture_output=True, text=True, env={**os.environ, "REDIS_URL": redis_url}, timeout=60)
        assert listed.returncode == 2 and "--limit" in listed.stderr, listed
