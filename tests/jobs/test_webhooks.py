"""Job webhooks through real processes: signed per Standard Webhooks, retried, and guarded against SSRF."""

from __future__ import annotations

import signal
import socket
from typing import Any

import httpx
import pytest
import redis
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.jobs.conftest import UPSTREAM_KEY
from tests.jobs.test_jobs import config, finished, get_job, submit
from tests.support.procs import Service, start_gateway, wait_until
from tests.support.seaweed import S3Store
from tests.support.webhooks import Receiver

ADMIN = "admin-token-for-webhook-tests"


def start(fake: Service, redis_url: str, store: S3Store, **jobs: Any) -> Service:
    cfg = {**config({}, **jobs), "storage": {"bucket": store.bucket}}
    return start_gateway(cfg, {"TTAPI_API_KEY": UPSTREAM_KEY, "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_url,
                               "GATEWAY_ADMIN_TOKEN": ADMIN, **store.env()})


def create_key(gw: Service, webhook_url: str, user: str = "carol") -> httpx.Response:
    return httpx.post(gw.url + "/admin/keys", json={"user": user, "plan": "p", "webhook_url": webhook_url},
                      headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)


def test_signed_webhook_verifies_tampered_does_not_failing_receiver_is_retried(
        fake: Service, redis_url: str, s3_store: S3Store) -> None:
    gw = start(fake, redis_url, s3_store, allow_private_webhooks=True, webhook_first_retry_seconds=0.2)
    try:
        with Receiver(fail_first=2) as receiver:
            created = create_key(gw, receiver.url)
            assert created.status_code == 201, created.text
            secret = created.json()["webhook_secret"]
            assert secret.startswith("whsec_") and created.json()["webhook_url"] == receiver.url
            listed = httpx.get(gw.url + "/admin/keys", params={"user": "carol"},
                               headers={"authorization": f"Bearer {ADMIN}"}).json()["data"]
            assert listed[0]["webhook_url"] == receiver.url and "webhook_secret" not in listed[0]
            job_id = submit(gw, key=created.json()["key"]).json()["id"]
            assert finished(gw, job_id, key=created.json()["key"])["status"] == "succeeded"
            wait_until(lambda: len(receiver.received) >= 3, "3 webhook attempts")
            assert [r.status for r in receiver.received[:3]] == [503, 503, 204]
            last = receiver.received[2]
            assert {r.headers["webhook-id"] for r in receiver.received} == {f"msg_{job_id}"}
            assert last.headers["webhook-signature"].startswith("v1,")
            event = Webhook(secret).verify(last.body, last.headers)
            assert event["id"] == job_id and event["status"] == "succeeded"
            assert httpx.get(event["result"]["data"][0]["url"]).status_code == 200
            with pytest.raises(WebhookVerificationError):
                Webhook(secret).verify(last.body.replace(b"succeeded", b"failed"), last.headers)
            with pytest.raises(WebhookVerificationError):
                Webhook("whsec_" + "QUFB" * 8).verify(last.body, last.headers)
            state = get_job(gw, job_id, key=created.json()["key"]).json()["webhook"]
            assert state["status"] == "delivered" and state["attempts"] == 3 and state["last_status"] == 204
        assert secret not in gw.log()
    finally:
        gw.stop()


def test_webhook_to_loopback_is_refused_by_default(fake: Service, redis_url: str, s3_store: S3Store) -> None:
    gw = start(fake, redis_url, s3_store)
    try:
        with Receiver() as receiver:
            literal = create_key(gw, receiver.url)  # http://127.0.0.1:<port>/hook
            assert literal.status_code == 400 and literal.json()["error"]["param"] == "webhook_url"
            assert create_key(gw, "file:///etc/passwd").status_code == 400
            # A name is checked where it resolves, each time a delivery connects.
            named = create_key(gw, f"http://localhost:{receiver.port}/hook")
            assert named.status_code == 201
            key = named.json()["key"]
            job_id = submit(gw, key=key).json()["id"]
            assert finished(gw, job_id, key=key)["status"] == "succeeded"
            wait_until(lambda: get_job(gw, job_id, key=key).json()["webhook"]["status"] == "failed", "refusal")
            assert receiver.received == []
            metrics = httpx.get(gw.url + "/metrics").text
            assert 'gateway_webhook_deliveries_total{outcome="refused"} 1.0' in metrics
    finally:
        gw.stop()


def test_a_silent_receiver_does_not_hold_back_another_users_webhook(fake: Service, redis_url: str,
                                                                   s3_store: S3Store) -> None:
    # A receiver that accepts connections and never answers: each attempt to it waits the full timeout.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(256)
    gw = start(fake, redis_url, s3_store, allow_private_webhooks=True, webhook_timeout_seconds=120)
    try:
        with Receiver() as receiver:
            dave = create_key(gw, f"http://127.0.0.1:{silent.getsockname()[1]}/hook", user="dave").json()["key"]
            carol = create_key(gw, receiver.url).json()["key"]
            stuck = [submit(gw, key=dave).json()["id"] for _ in range(40)]
            for job_id in stuck:
                assert finished(gw, job_id, key=dave)["status"] == "succeeded"
            job_id = submit(gw, key=carol).json()["id"]
            wait_until(lambda: len(receiver.received) == 1, "carol's webhook", timeout=60)
            assert receiver.received[0].headers["webhook-id"] == f"msg_{job_id}"
            # Delivered while every attempt to the silent receiver is still waiting for its answer.
            assert all(get_job(gw, i, key=dave).json()["webhook"]["attempts"] == 0 for i in stuck)
    finally:
        gw.stop()
        silent.close()


def test_a_runner_that_stalled_past_its_claim_does_not_finish_the_job_again(fake: Service, redis_url: str,
                                                                            s3_store: S3Store) -> None:
    """A runner frozen (SIGSTOP: a GC pause, a partition) loses its job to another one; when it wakes up and its
    upstream call ends, the job is already finished: no second webhook, the delivered state stays."""
    httpx.post(fake.url + "/_fake/reset").raise_for_status()
    stalled = start(fake, redis_url, s3_store, allow_private_webhooks=True)  # visibility timeout 2 s
    other: Service | None = None
    try:
        with Receiver() as receiver:
            key = create_key(stalled, receiver.url).json()["key"]
            job_id = submit(stalled, key=key, fake={"gate": "stalled-runner"}).json()["id"]
            wait_until(lambda: httpx.get(fake.url + "/_fake/stats").json()["in_flight"] == 1, "first call upstream")
            assert stalled.proc is not None
            stalled.proc.send_signal(signal.SIGSTOP)
            other = start(fake, redis_url, s3_store, allow_private_webhooks=True)
            wait_until(lambda: httpx.get(fake.url + "/_fake/stats").json()["in_flight"] == 2, "job taken over")
            httpx.post(fake.url + "/_fake/gates/stalled-runner").raise_for_status()
            wait_until(lambda: get_job(other, job_id, key=key).json()["webhook"]["status"] == "delivered",
                       "webhook delivered", timeout=60)
            stalled.proc.send_signal(signal.SIGCONT)
            stalled.stop()  # SIGTERM: its job's upstream call and finish run to their end first
            state = get_job(other, job_id, key=key).json()["webhook"]
            assert state["status"] == "delivered" and state["attempts"] == 1, state
            assert redis.Redis.from_url(redis_url).zscore("igw:webhooks", f"carol/{job_id}") is None
            assert len(receiver.received) == 1
    finally:
        if stalled.proc is not None:
            stalled.proc.send_signal(signal.SIGCONT)
        stalled.stop()
        if other is not None:
            other.stop()
