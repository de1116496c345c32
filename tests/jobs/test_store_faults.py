"""Edit jobs when the image store fails: at submission, while queued, at run time; and what they keep where.

Real processes: redis-server, SeaweedFS, the fake TTAPI and the gateway. A store that fails is
played by ``TcpRelay`` in front of the real SeaweedFS (taken down, brought back, or cut after a
budget of uploaded bytes): the S3 traffic itself is real. Each test failed before its fix (found
by an attacker's probe of edits as jobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import signal
import threading
from typing import Any

import httpx
import redis
from PIL import Image

from tests.jobs.conftest import UPSTREAM_KEY
from tests.jobs.test_jobs import ALICE, config, finished, records, submit
from tests.support.procs import Service, start_gateway, wait_until
from tests.support.seaweed import S3Store
from tests.support.tcp_relay import TcpRelay


def start(fake: Service, redis_url: str, store: S3Store, plan: dict[str, Any], endpoint: str | None = None,
          **jobs: Any) -> Service:
    cfg = {**config(plan, **jobs), "storage": {"bucket": store.bucket}}
    env = {"TTAPI_API_KEY": UPSTREAM_KEY, "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_url, **store.env()}
    if endpoint:
        env["STORAGE_ENDPOINT_URL"] = endpoint
    return start_gateway(cfg, env)


def picture(colour: str = "red", size: int = 64, noise: bool = False) -> bytes:
    out = io.BytesIO()
    pixels = random.randbytes(size * size * 3) if noise else None  # noise: a PNG that does not compress
    image = Image.frombytes("RGB", (size, size), pixels) if pixels else Image.new("RGB", (size, size), colour)
    image.save(out, "PNG")
    return out.getvalue()


def edit(gw: Service, images: list[bytes] | None = None, **fields: str) -> httpx.Response:
    data = {"prompt": "add a hat", "model": "gpt-image-1", "quality": "low", **fields}
    files = [("image[]", (f"in{i}.png", im, "image/png")) for i, im in enumerate(images or [picture()])]
    return httpx.post(gw.url + "/v1/images/edits", data=data, files=files,
                      headers={"authorization": f"Bearer {ALICE}", "prefer": "respond-async"}, timeout=60)


def job_objects(store: S3Store, job_id: str = "") -> list[str]:
    return asyncio.run(store.object_keys(f"jobs/{job_id}")) or []


def _edit_ignoring_errors(gw: Service, images: list[bytes]) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the gateway is killed before it answers
        edit(gw, images)


def stats(upstream: Service) -> dict[str, Any]:
    return httpx.get(upstream.url + "/_fake/stats").json()  # type: ignore[no-any-return]


def day_usage(redis_url: str, user: str) -> dict[str, str]:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    [key] = r.keys(f"igw:{{u:{user}}}:d:*")
    return r.hgetall(key)  # type: ignore[return-value]


def _held_then_store_down(upstream: Service, redis_url: str, s3_store: S3Store,
                          gate: str) -> tuple[Service, TcpRelay, str]:
    """A gated job holds alice's only slot; B waits with its files stored; the store goes down; A ends (500)."""
    proxy = TcpRelay(s3_store.endpoint)
    gw = start(upstream, redis_url, s3_store, {"max_concurrent_requests": 1}, endpoint=proxy.endpoint)
    assert edit(gw, fake=f'{{"gate": "{gate}", "status": 500}}').status_code == 202
    wait_until(lambda: stats(upstream)["in_flight"] == 1, "the first job upstream")
    b = edit(gw, images=[picture("blue")])
    assert b.status_code == 202, b.text
    proxy.down()
    httpx.post(upstream.url + f"/_fake/gates/{gate}").raise_for_status()
    wait_until(lambda: "the image store is unavailable; it runs again" in gw.log(), "B's run failing on the store")
    proxy.restore()
    return gw, proxy, b.json()["id"]


def test_an_edit_job_run_while_the_store_was_down_is_billed_once(upstream: Service, redis_url: str,
                                                                        s3_store: S3Store) -> None:
    """A run that failed on the store settles nothing: the re-run bills the job once (it had billed it never)."""
    gw, proxy, b = _held_then_store_down(upstream, redis_url, s3_store, "attack-bill")
    try:
        assert finished(gw, b)["status"] == "succeeded"  # it did go upstream and the upstream billed it
        mine = [r for r in records(redis_url, "alice") if r["request_id"] == b]
        assert len(mine) == 1 and int(mine[0]["images"]) == 1, mine
        assert int(day_usage(redis_url, "alice").get("images", 0)) == 1
    finally:
        gw.stop()
        proxy.close()


def test_after_the_store_came_back_the_users_slot_is_free(upstream: Service, redis_url: str,
                                                                  s3_store: S3Store) -> None:
    """The failed run gives back only its slot; the user's next request is admitted (it was held by a lease)."""
    gw, proxy, b = _held_then_store_down(upstream, redis_url, s3_store, "attack-slot")
    try:
        assert finished(gw, b)["status"] == "succeeded"
        sync = httpx.post(gw.url + "/v1/images/generations", json={"prompt": "a cat", "quality": "low"},
                          headers={"authorization": f"Bearer {ALICE}"}, timeout=30)
        assert sync.status_code == 200, sync.text  # nothing in flight: not 429
    finally:
        gw.stop()
        proxy.close()


def test_a_store_failing_mid_submission_leaves_no_files(upstream: Service, redis_url: str,
                                                               s3_store: S3Store) -> None:
    """A 502 at submission leaves nothing: the files stored before the failing one are deleted, by a runner
    once the store is back (the store that failed the upload refuses their deletion too)."""
    proxy = TcpRelay(s3_store.endpoint)
    gw = start(upstream, redis_url, s3_store, {}, endpoint=proxy.endpoint, upload_grace_seconds=1)
    try:
        first, second = picture(size=700, noise=True), picture(size=700, noise=True)
        proxy.cut_after(len(first) + 200_000)  # the first file's PUT goes through, the second's is cut
        answer = edit(gw, images=[first, second])
        assert answer.status_code == 502 and answer.json()["error"]["code"] == "storage_unavailable", answer.text
        assert len(job_objects(s3_store)) == 1  # the first file, stored before the cut
        proxy.restore()
        wait_until(lambda: job_objects(s3_store) == [], "the orphaned file deleted")
        assert redis.Redis.from_url(redis_url).zcard("igw:jobuploads") == 0
        assert records(redis_url, "alice") == []
    finally:
        gw.stop()
        proxy.close()


def test_an_edit_jobs_text_fields_are_not_kept_in_redis(upstream: Service, redis_url: str,
                                                               s3_store: S3Store) -> None:
    """40 text fields of 1 MiB (each allowed, 64 MiB body) go to the store, not the job's hash (7 days in Redis).

    docs/architecture.md: a large multipart body belongs in the image store, not the job hash; submissions are
    not paced, so a user's quota of jobs times 64 MiB fills the Redis every user's limits live in.
    """
    gw = start(upstream, redis_url, s3_store, {})
    try:
        pads = {f"pad{i}": "x" * ((1 << 20) - 16) for i in range(40)}
        answer = edit(gw, None, **pads)
        assert answer.status_code == 202, answer.text
        job = answer.json()["id"]
        assert finished(gw, job)["status"] == "succeeded"
        kept = redis.Redis.from_url(redis_url).hstrlen(f"igw:{{u:alice}}:job:{job}", "body")
        assert kept < 4096, kept  # where the files and the manifest are: a few hundred bytes
    finally:
        gw.stop()


def test_a_cancelled_jobs_files_are_deleted_when_it_is_cancelled(upstream: Service, redis_url: str,
                                                                       s3_store: S3Store) -> None:
    """A cancelled job's files go at once, not when a runner reaches its entry behind the user's running jobs."""
    gw = start(upstream, redis_url, s3_store, {"max_concurrent_requests": 1})
    try:
        assert edit(gw, fake='{"gate": "attack-deep"}').status_code == 202
        wait_until(lambda: stats(upstream)["in_flight"] == 1, "the first job upstream")
        edit(gw)  # the runner reads this one and paces it
        third = edit(gw).json()["id"]  # not read yet: the user already has a paced job
        assert job_objects(s3_store, third)
        cancelled = httpx.delete(f"{gw.url}/v1/images/jobs/{third}", headers={"authorization": f"Bearer {ALICE}"})
        assert cancelled.status_code == 200, cancelled.text
        wait_until(lambda: job_objects(s3_store, third) == [], "the cancelled job's files deleted")
    finally:
        httpx.post(upstream.url + "/_fake/gates/attack-deep")
        gw.stop()


def test_a_result_the_store_could_not_keep_runs_again_billed_once_and_frees_the_slot(upstream: Service,
                                                                                   redis_url: str,
                                                                                   s3_store: S3Store) -> None:
    """The upstream answered but the images could not be stored: the job runs again (same Idempotency-Key),
    its second settle counts nothing twice, and still frees the slot its re-run took."""
    relay = TcpRelay(s3_store.endpoint)
    gw = start(upstream, redis_url, s3_store, {"max_concurrent_requests": 1}, endpoint=relay.endpoint)
    try:
        job = submit(gw, fake={"gate": "result-store"}).json()["id"]
        wait_until(lambda: stats(upstream)["in_flight"] == 1, "the job upstream")
        relay.down()
        httpx.post(upstream.url + "/_fake/gates/result-store").raise_for_status()
        wait_until(lambda: "the image store is unavailable; it runs again" in gw.log(), "the result not stored")
        relay.restore()
        assert finished(gw, job)["status"] == "succeeded"
        sent = [e["headers"]["idempotency-key"] for e in stats(upstream)["recent"]]
        assert len(sent) == 2 and len(set(sent)) == 1  # run twice, as one request to the upstream
        mine = [r for r in records(redis_url, "alice") if r["request_id"] == job]
        assert len(mine) == 1 and int(mine[0]["images"]) == 1, mine
        assert int(day_usage(redis_url, "alice")["images"]) == 1
        sync = httpx.post(gw.url + "/v1/images/generations", json={"prompt": "a cat", "quality": "low"},
                          headers={"authorization": f"Bearer {ALICE}"}, timeout=30)
        assert sync.status_code == 200, sync.text  # the re-run's slot was freed
    finally:
        gw.stop()
        relay.close()


def test_files_of_a_worker_killed_mid_upload_are_deleted_by_the_next_gateway(upstream: Service, redis_url: str,
                                                                             s3_store: S3Store) -> None:
    """SIGKILL while an edit's second file is being stored: no job, no 202; the next gateway deletes the first."""
    relay = TcpRelay(s3_store.endpoint)
    gw = start(upstream, redis_url, s3_store, {}, endpoint=relay.endpoint, upload_grace_seconds=1)
    try:
        first, second = picture(size=700, noise=True), picture(size=700, noise=True)
        relay.cut_after(len(first) + 200_000, stall=True)  # the second file's PUT hangs, unanswered
        threading.Thread(target=_edit_ignoring_errors, args=(gw, [first, second]), daemon=True).start()
        wait_until(lambda: relay.stalled and len(job_objects(s3_store)) == 1, "the first file stored, then a stall")
        gw.stop(signal.SIGKILL)
    finally:
        relay.close()
    gw2 = start(upstream, redis_url, s3_store, {}, upload_grace_seconds=1)
    try:
        wait_until(lambda: job_objects(s3_store) == [], "the dead worker's file deleted")
        assert redis.Redis.from_url(redis_url).zcard("igw:jobuploads") == 0
    finally:
        gw2.stop()
