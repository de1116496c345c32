"""Idempotency-Key as a user sees it: the official SDK → gateway process → fake TTAPI process, real Redis.

Each test uses fresh keys (uuid), so tests share the module's gateway (two workers: a repeat may
land on either) without meeting each other.
"""

from __future__ import annotations

import hashlib
import io
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from PIL import Image

from gateway.pipeline.onbehalf import upstream_idempotency_key
from gateway.redisdb.keys import RedisKeys
from tests.support.procs import (
    RedisServer,
    Service,
    free_port,
    module_fake_upstream,
    start_gateway,
    wait_until,
)

ALICE, BOB, CAROL, DAVE = (f"sk-igw-idem-{name}-0123456789abcdef" for name in ("alice", "bob", "carol", "dave"))
UPSTREAM_KEY = "tt-idem-key"
PROMPT = {"model": "gpt-image-1", "prompt": "a lighthouse", "quality": "low", "size": "1024x1024"}


def config(**extra: Any) -> dict[str, Any]:
    users = {ALICE: ("alice", "default"), BOB: ("bob", "default"), CAROL: ("carol", "single"),
             DAVE: ("dave", "default")}
    return {"plans": {"default": {}, "single": {"max_concurrent_requests": 1}},
            "keys": [{"user": user, "plan": plan, "sha256": hashlib.sha256(key.encode()).hexdigest()}
                     for key, (user, plan) in users.items()],
            "upstream": {"timeout_seconds": 3}, **extra}  # extra may override upstream


fake = module_fake_upstream(UPSTREAM_KEY)


def env(fake_url: str, redis_url: str) -> dict[str, str]:
    return {"TTAPI_API_KEY": UPSTREAM_KEY, "UPSTREAM_BASE_URL": fake_url, "REDIS_URL": redis_url}


@pytest.fixture(scope="module")
def gateway(fake: Service, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = start_gateway(config(), env(fake.url, redis_server.url), tmp=tmp_path_factory.mktemp("gw"), workers=2)
    yield svc
    svc.stop()


@pytest.fixture
def calls(fake: Service) -> Any:
    """How many generation requests the fake upstream has received since the test began."""
    httpx.post(fake.url + "/_fake/reset")
    return lambda: httpx.get(fake.url + "/_fake/stats").json()["requests"]


def sdk(gateway: Service, key: str = ALICE, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, **kw)


def generate(gateway: Service, idem: str, key: str = ALICE, timeout: float = 60, **body: Any) -> Any:
    """The raw answer of an SDK call carrying ``Idempotency-Key: idem``."""
    fields = {**PROMPT, **body}
    extra = {k: fields.pop(k) for k in ("fake",) if k in fields}
    return sdk(gateway, key, max_retries=0, timeout=timeout).images.with_raw_response.generate(
        **fields, extra_body=extra, extra_headers={"Idempotency-Key": idem}).http_response


def new_key() -> str:
    return f"idem-{uuid.uuid4()}"


def test_a_repeat_gets_the_first_answer_byte_for_byte_and_the_upstream_is_called_once(gateway: Service,
                                                                                       calls: Any) -> None:
    key = new_key()
    first = generate(gateway, key)
    again = generate(gateway, key)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and b"b64_json" in first.content
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["x-request-id"] != first.headers["x-request-id"]
    # The same request written differently (key order, spacing, the default model implied) is a repeat.
    raw = httpx.post(gateway.url + "/v1/images/generations", headers={
        "authorization": f"Bearer {ALICE}", "idempotency-key": key, "content-type": "application/json"},
        content=b'{ "size" : "1024x1024", "quality":"low",\n "prompt": "a lighthouse" }')
    assert raw.status_code == 200 and raw.content == first.content and raw.headers["idempotent-replayed"] == "true"
    assert calls() == 1
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'gateway_idempotent_replays_total{route="/v1/images/generations"}' in metrics


def test_concurrent_repeats_wait_for_the_first_and_get_its_answer(gateway: Service, calls: Any) -> None:
    key = new_key()
    start = threading.Barrier(5)

    def one(_: int) -> Any:
        start.wait()
        return generate(gateway, key, fake={"latency": 1})

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(one, range(5)))
    assert calls() == 1
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert sorted(a.headers.get("idempotent-replayed", "") for a in answers) == ["", "true", "true", "true", "true"]


def test_the_same_key_with_another_request_is_refused_with_422(gateway: Service, calls: Any) -> None:
    key = new_key()
    generate(gateway, key)
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        generate(gateway, key, prompt="another lighthouse")
    error = caught.value.body
    assert caught.value.status_code == 422
    assert error["code"] == "idempotency_key_reused" and error["param"] == "Idempotency-Key"  # type: ignore[index]
    assert calls() == 1


def test_keys_are_scoped_per_user(gateway: Service, fake: Service, calls: Any) -> None:
    key = new_key()
    alice, bob = generate(gateway, key, ALICE), generate(gateway, key, BOB)
    assert "idempotent-replayed" not in alice.headers and "idempotent-replayed" not in bob.headers
    assert calls() == 2
    seen = [r["headers"]["idempotency-key"] for r in httpx.get(fake.url + "/_fake/stats").json()["recent"]]
    assert seen == [upstream_idempotency_key("alice", key), upstream_idempotency_key("bob", key)]


@pytest.mark.parametrize("value", ["", "k" * 256, "caf\u00e9"])
def test_a_malformed_key_is_refused_with_400(gateway: Service, calls: Any, value: str) -> None:
    r = httpx.post(gateway.url + "/v1/images/generations", json=PROMPT,
                   headers={"authorization": f"Bearer {ALICE}", "idempotency-key": value.encode("latin-1")})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_value" and r.json()["error"]["param"] == "Idempotency-Key"
    assert calls() == 0


def test_requests_the_gateway_refused_do_not_burn_their_key(gateway: Service, fake: Service, calls: Any) -> None:
    key = new_key()
    with pytest.raises(openai.BadRequestError):
        generate(gateway, key, key=CAROL, n=11)  # invalid: refused before the key is claimed
    # Carol may run one request at a time: a second while the first runs is refused (429) after the claim.
    gate = new_key()
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(generate, gateway, new_key(), CAROL, fake={"gate": gate})
        wait_until(lambda: calls() == 1, "the held request at the upstream")
        with pytest.raises(openai.RateLimitError):
            generate(gateway, key, key=CAROL)
        httpx.post(f"{fake.url}/_fake/gates/{gate}")
        assert held.result().status_code == 200
    # Not held until the claim's lease ends (upstream timeout + 60 s): it runs at once.
    answer = generate(gateway, key, key=CAROL, timeout=30)
    assert answer.status_code == 200 and "idempotent-replayed" not in answer.headers
    assert calls() == 2


def test_a_stream_replay_gives_the_same_event_bytes(gateway: Service, calls: Any) -> None:
    key = new_key()

    def stream() -> tuple[bytes, httpx.Headers]:
        client = sdk(gateway, max_retries=0)
        with client.images.with_streaming_response.generate(
                **PROMPT, stream=True, partial_images=2, extra_headers={"Idempotency-Key": key}) as response:
            return b"".join(response.iter_bytes()), response.headers

    (first, first_headers), (again, again_headers) = stream(), stream()
    assert first.count(b"event: ") == 3 and first == again
    assert again_headers["content-type"].startswith("text/event-stream")
    assert again_headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first_headers
    assert calls() == 1


def test_an_upstream_timeout_after_sending_is_stored_and_replayed(gateway: Service, calls: Any) -> None:
    key = new_key()
    with pytest.raises(openai.InternalServerError) as first:
        generate(gateway, key, fake={"hang": True})  # past upstream.timeout_seconds (3)
    with pytest.raises(openai.InternalServerError) as again:
        generate(gateway, key, fake={"hang": True})
    assert first.value.status_code == again.value.status_code == 504
    assert again.value.response.content == first.value.response.content
    assert again.value.response.headers["idempotent-replayed"] == "true"
    assert again.value.response.headers["x-should-retry"] == "false"
    assert calls() == 1


def test_sdk_retries_after_a_client_timeout_are_billed_once(gateway: Service, redis_server: RedisServer,
                                                             calls: Any) -> None:
    """The motivating case: the client gives up before the image is ready and the SDK retries."""
    client = sdk(gateway, DAVE, timeout=1.0, max_retries=6)
    result = client.images.generate(**PROMPT, extra_body={"fake": {"latency": 1.5}},
                                    extra_headers={"Idempotency-Key": new_key()})
    assert result.data[0].b64_json
    assert calls() == 1
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    usage = redis.Redis(port=redis_server.port)
    wait_until(lambda: usage.hget(f"igw:{{u:dave}}:d:{day}", "requests") is not None, "dave's settlement")
    assert usage.hget(f"igw:{{u:dave}}:d:{day}", "requests") == b"1"
    assert usage.xlen("igw:{u:dave}:ledger") == 1


def test_a_repeat_after_a_gateway_restart_still_replays(fake: Service, redis_url: str, calls: Any,
                                                         tmp_path: Path) -> None:
    key = new_key()
    first_gateway = start_gateway(config(), env(fake.url, redis_url), tmp=tmp_path)
    first = generate(first_gateway, key)
    first_gateway.stop()
    second_gateway = start_gateway(config(), env(fake.url, redis_url), tmp=tmp_path)
    try:
        again = generate(second_gateway, key)
    finally:
        second_gateway.stop()
    assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
    assert calls() == 1


def test_an_unreachable_upstream_does_not_burn_the_key(redis_url: str, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: the request never reaches an upstream
    svc = start_gateway(config(), env(closed, redis_url), tmp=tmp_path)
    try:
        key = new_key()
        answers = []
        for _ in range(2):
            with pytest.raises(openai.InternalServerError) as caught:
                generate(svc, key)
            answers.append(caught.value)
    finally:
        svc.stop()
    assert [a.status_code for a in answers] == [502, 502]
    assert all(a.body["code"] == "upstream_unavailable" for a in answers)  # type: ignore[index]
    assert "idempotent-replayed" not in answers[1].response.headers


def test_a_retry_after_the_gateway_stopped_mid_request_gets_its_answer(fake: Service, redis_url: str, calls: Any,
                                                                       tmp_path: Path) -> None:
    """The 503 of a gateway stopping past its grace says: retry with the same key. That retry gets the image."""
    key, gate = new_key(), new_key()
    stopping = start_gateway(config(upstream={"timeout_seconds": 60}),
                             {**env(fake.url, redis_url), "GATEWAY_GRACE_SECONDS": "1"}, tmp=tmp_path)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(generate, stopping, key, fake={"gate": gate})
        wait_until(lambda: calls() == 1, "the request at the upstream")
        stopped = pool.submit(stopping.stop, signal.SIGTERM)  # returns once the process has exited
        with pytest.raises(openai.InternalServerError) as refused:
            first.result()
        assert refused.value.status_code == 503 and refused.value.response.headers["x-should-retry"] == "false"
        httpx.post(f"{fake.url}/_fake/gates/{gate}")  # the upstream answers the call still running
        stopped.result()
    restarted = start_gateway(config(), env(fake.url, redis_url), tmp=tmp_path)
    try:
        again = generate(restarted, key, fake={"gate": gate})
    finally:
        restarted.stop()
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert b"b64_json" in again.content
    assert calls() == 1


def test_an_edit_repeat_replays_and_another_image_under_the_key_is_422(gateway: Service, calls: Any) -> None:
    key = new_key()

    def edit(colour: str, filename: str = "in.png") -> Any:
        picture = io.BytesIO()
        Image.new("RGB", (64, 64), colour).save(picture, "PNG")
        return sdk(gateway, max_retries=0).images.with_raw_response.edit(
            image=(filename, picture.getvalue(), "image/png"), prompt="add a hat", model="gpt-image-1",
            quality="low", extra_headers={"Idempotency-Key": key}).http_response

    first, again = edit("red"), edit("red")  # the SDK draws a new multipart boundary each time
    assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
    with pytest.raises(openai.UnprocessableEntityError):
        edit("blue")
    with pytest.raises(openai.UnprocessableEntityError):  # the same generation body on another route
        generate(gateway, key, prompt="add a hat")
    assert calls() == 1


def test_a_repeat_that_waited_out_a_dead_workers_lease_is_billed_what_it_used(fake: Service, redis_url: str,
                                                                              calls: Any, tmp_path: Path) -> None:
    """The repeat is admitted after its wait: its lease runs from then (SPEC §4.4), not from its arrival, so it
    is not recorded as a dead worker's request while it runs, and its settle is not thrown away."""
    key, gate = new_key(), new_key()
    # Leases of 6 s (upstream timeout 5 s + 1 s): a repeat waits about that long for the dead one's.
    cfg = config(upstream={"timeout_seconds": 5}, limits={"lease_slack_seconds": 1, "sweep_interval_seconds": 0.2})
    dying = start_gateway(cfg, env(fake.url, redis_url), tmp=tmp_path)
    other = start_gateway(cfg, env(fake.url, redis_url), tmp=tmp_path)  # a replica sharing the Redis
    db = redis.Redis.from_url(redis_url)
    inflight = RedisKeys().inflight("alice")
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(generate, dying, key, fake={"gate": gate})
            wait_until(lambda: calls() == 1, "the first request at the upstream")
            [(dead_id, _)] = db.zrange(inflight, 0, -1, withscores=True)
            dying.stop(signal.SIGKILL)
            with pytest.raises(openai.APIConnectionError):
                first.result()
            repeat = pool.submit(generate, other, key, fake={"gate": gate})
            # Taken over once the dead lease ended: the repeat is at the upstream, held at the gate, and its
            # lease (the in-flight entry other than the dead one's) ends in the future.
            wait_until(lambda: calls() == 2, "the repeat at the upstream", timeout=60)
            leases = dict(db.zrange(inflight, 0, -1, withscores=True))
            leases.pop(dead_id, None)
            [deadline] = leases.values()
            assert deadline > time.time() * 1000
            httpx.post(f"{fake.url}/_fake/gates/{gate}").raise_for_status()
            answer = repeat.result()
        assert answer.status_code == 200 and "idempotent-replayed" not in answer.headers
        rid = answer.headers["x-request-id"]
        wait_until(lambda: any(f[b"request_id"].decode() == rid for _, f in db.xrange(RedisKeys().ledger("alice"))),
                   "the repeat's record")
        [record] = [f for _, f in db.xrange(RedisKeys().ledger("alice")) if f[b"request_id"].decode() == rid]
        assert (record[b"status"], record[b"settled"]) == (b"200", b"true")
    finally:
        dying.stop(signal.SIGKILL)
        other.stop()
