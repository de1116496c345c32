"""Edits as asynchronous jobs, through real processes: the official SDK, gateway, fake TTAPI, Redis, SeaweedFS.

An edit's files wait in the image store while the job is queued; the upstream gets them byte for
byte when it runs; they are deleted when the job ends or is cancelled. A cancelled job's webhook
is sent like a finished one's.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from typing import Any

import httpx
import openai
from PIL import Image
from standardwebhooks.webhooks import Webhook

from gateway.devtools.fake_answers import INPUT_IMAGE_TOKENS
from tests.jobs.conftest import UPSTREAM_KEY
from tests.jobs.test_jobs import ALICE, config, finished, get_job, records
from tests.support.procs import Service, start_gateway, wait_until
from tests.support.seaweed import S3Store
from tests.support.webhooks import Receiver

ADMIN = "admin-token-for-edit-job-tests"
PNG = b"\x89PNG\r\n\x1a\n"






def start(fake: Service, redis_url: str, store: S3Store, plan: dict[str, Any], **jobs: Any) -> Service:
    cfg = {**config(plan, **jobs), "storage": {"bucket": store.bucket}}
    return start_gateway(cfg, {"TTAPI_API_KEY": UPSTREAM_KEY, "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_url,
                               "GATEWAY_ADMIN_TOKEN": ADMIN, **store.env()})


def picture(colour: str, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(out, fmt)
    return out.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def job_inputs(store: S3Store, job_id: str) -> list[str] | None:
    return asyncio.run(store.object_keys(f"jobs/{job_id}/"))


def submit_edit(gw: Service, key: str, image: bytes, **fields: str) -> httpx.Response:
    data = {"prompt": "add a hat", "model": "gpt-image-1", "quality": "low", **fields}
    return httpx.post(gw.url + "/v1/images/edits", data=data, files=[("image[]", ("in.png", image, "image/png"))],
                      headers={"authorization": f"Bearer {key}", "prefer": "respond-async"}, timeout=30)


def test_an_edit_job_sends_its_files_byte_for_byte_and_then_deletes_them(upstream: Service, redis_url: str,
                                                                         s3_store: S3Store) -> None:
    gw = start(upstream, redis_url, s3_store, {"requests_per_minute": 60})
    try:
        first, second, mask = picture("red"), picture("blue", "JPEG"), picture("black")
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=ALICE, max_retries=0, timeout=60)
        raw = client.images.with_raw_response.edit(
            image=[("first.png", first, "image/png"), ("second photo.jpg", second, "image/jpeg")],
            mask=("mask.png", mask, "image/png"), prompt="add a hat", model="gpt-image-1", quality="low",
            extra_headers={"prefer": "respond-async"})
        assert raw.status_code == 202, raw.text()
        job = raw.http_response.json()
        assert job["object"] == "image.job" and job["status"] == "queued"
        assert raw.headers["location"] == f"/v1/images/jobs/{job['id']}"
        done = finished(gw, job["id"])
        assert done["status"] == "succeeded", done
        assert httpx.get(done["result"]["data"][0]["url"], timeout=30).content.startswith(PNG)
        [seen] = httpx.get(upstream.url + "/_fake/stats").json()["recent"]
        assert seen["path"] == "/v1/images/edits" and seen["headers"]["idempotency-key"]
        assert [(f["field"], f["filename"], f["content_type"], f["sha256"]) for f in seen["files"]] == [
            ("image[]", "first.png", "image/png", sha(first)),
            ("image[]", "second photo.jpg", "image/jpeg", sha(second)),
            ("mask", "mask.png", "image/png", sha(mask))]
        assert dict(seen["fields"])["prompt"] == "add a hat"
        [record] = [r for r in records(redis_url, "alice") if r["request_id"] == job["id"]]
        assert record["route"] == "edits" and int(record["input_image_tokens"]) == 2 * INPUT_IMAGE_TOKENS
        wait_until(lambda: job_inputs(s3_store, job["id"]) == [], "the job's input files deleted")
    finally:
        gw.stop()


def test_a_bad_edit_is_refused_at_submission_and_nothing_is_kept(upstream: Service, redis_url: str,
                                                                 s3_store: S3Store) -> None:
    gw = start(upstream, redis_url, s3_store, {})
    try:
        refused = submit_edit(gw, ALICE, b"this is not an image")
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "image"
        assert not [k for k in asyncio.run(s3_store.object_keys()) or [] if k.startswith("jobs/")]
        assert records(redis_url, "alice") == []
        assert httpx.get(upstream.url + "/_fake/stats").json()["requests"] == 0
    finally:
        gw.stop()


def test_a_cancelled_edit_job_sends_its_webhook_and_its_files_are_deleted(upstream: Service, redis_url: str,
                                                                         s3_store: S3Store) -> None:
    gw = start(upstream, redis_url, s3_store, {"max_concurrent_requests": 1}, allow_private_webhooks=True)
    try:
        with Receiver() as receiver:
            created = httpx.post(gw.url + "/admin/keys", headers={"authorization": f"Bearer {ADMIN}"}, timeout=30,
                                 json={"user": "alice", "plan": "p", "webhook_url": receiver.url})
            assert created.status_code == 201, created.text
            key, secret = created.json()["key"], created.json()["webhook_secret"]
            # The first job holds the user's only slot for a few seconds: the second waits, queued.
            first = submit_edit(gw, key, picture("red"), fake='{"latency": 4}').json()["id"]
            second = submit_edit(gw, key, picture("green")).json()["id"]
            assert job_inputs(s3_store, second) == [f"jobs/{second}/0.png", f"jobs/{second}/request.json"]
            cancelled = httpx.delete(f"{gw.url}/v1/images/jobs/{second}", headers={"authorization": f"Bearer {key}"})
            assert cancelled.status_code == 200, cancelled.text
            wait_until(lambda: len(receiver.received) >= 1, "the cancelled job's webhook")
            event = Webhook(secret).verify(receiver.received[0].body, receiver.received[0].headers)
            assert event["id"] == second and event["status"] == "failed"
            assert event["error"]["code"] == "job_cancelled" and event["result"] is None
            wait_until(lambda: job_inputs(s3_store, second) == [], "the cancelled job's files deleted")
            assert finished(gw, first, key=key)["status"] == "succeeded"
            wait_until(lambda: len(receiver.received) >= 2, "the finished job's webhook")
            assert get_job(gw, second, key=key).json()["webhook"]["status"] == "delivered"
            assert [e["path"] for e in httpx.get(upstream.url + "/_fake/stats").json()["recent"]] == [
                "/v1/images/edits"]  # the cancelled job never went upstream
    finally:
        gw.stop()
