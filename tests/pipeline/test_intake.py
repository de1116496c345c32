"""The intake (gateway/pipeline/intake.py): in order, bounded, never losing a slot; and through a real gateway."""

from __future__ import annotations

import asyncio
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gateway.pipeline.intake import Intake, Slot
from gateway.redisdb.batcher import Shed
from tests.pipeline.test_gateway import KEY, burst, config, env, post
from tests.pipeline.test_overload import metric
from tests.support.procs import RedisServer, Service, start_gateway, wait_until


def later(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_waiters_enter_in_arrival_order_and_never_more_than_the_limit() -> None:
    intake = Intake(limit=2, max_waiting=100)
    entered: list[int] = []
    slots: dict[int, Slot] = {}

    async def one(i: int) -> None:
        slots[i] = await intake.enter(later())
        entered.append(i)

    tasks = [asyncio.ensure_future(one(i)) for i in range(6)]
    await settle()
    assert entered == [0, 1] and intake.held == 2 and intake.waiting == 4
    for i in range(6):
        slots[i].release()
        await settle()
        assert intake.held == min(2, 6 - i - 1)
    await asyncio.gather(*tasks)
    assert entered == [0, 1, 2, 3, 4, 5] and intake.held == 0 and intake.waiting == 0


async def test_a_full_waiting_line_sheds_at_once_and_a_late_one_sheds_at_its_deadline() -> None:
    intake = Intake(limit=1, max_waiting=1)
    holder = await intake.enter(later())
    waiter = asyncio.ensure_future(intake.enter(later()))
    await settle()
    with pytest.raises(Shed) as full:
        await intake.enter(later())
    assert full.value.reason == "queue_full"
    waiter.cancel()
    await settle()
    with pytest.raises(Shed) as late:
        await intake.enter(time.monotonic() + 0.05)
    assert late.value.reason == "deadline"
    holder.release()
    assert intake.held == 0 and intake.waiting == 0  # the cancelled and the late waiter left no trace
    assert intake.held == 0 and (await intake.enter(later())) is not None


async def test_a_slot_handed_to_a_waiter_cancelled_before_it_ran_goes_to_the_next() -> None:
    intake = Intake(limit=1, max_waiting=10)
    first = await intake.enter(later())
    second = asyncio.ensure_future(intake.enter(later()))
    third = asyncio.ensure_future(intake.enter(later()))
    await settle()
    first.release()  # handed to the second waiter...
    second.cancel()  # ...which is cancelled before it could run
    await settle()
    assert second.cancelled() and third.done()
    assert intake.held == 1 and intake.waiting == 0
    third.result().release()
    assert intake.held == 0


async def test_release_counts_once() -> None:
    intake = Intake(limit=1, max_waiting=10)
    slot = await intake.enter(later())
    slot.release()
    slot.release()
    assert intake.held == 0
    await intake.enter(later())
    assert intake.held == 1  # not -1 free slots: the second release gave nothing back


# --- through a gateway process whose intake holds one request at a time --------------------------------


def one_at_a_time(plan: dict[str, object], **redis: object) -> dict[str, object]:
    return config(plan, server={"intake_concurrency": 1},
                  redis={"admission_wait_seconds": 3, "health_timeout_seconds": 60, **redis})


def test_a_request_leaves_the_intake_before_its_upstream_call_not_when_answered(
        fake: Service, redis_url: str, tmp_path: Path) -> None:
    gw = start_gateway(one_at_a_time({"requests_per_minute": 1000}), env(fake, redis_url), tmp=tmp_path)
    httpx.post(fake.url + "/_fake/reset")
    try:
        with ThreadPoolExecutor(4) as pool:
            held = [pool.submit(post, gw.url, KEY, fake={"gate": "four"}) for _ in range(4)]
            # All four reach the upstream while none is answered: each left the one-slot intake before its call.
            wait_until(lambda: httpx.get(fake.url + "/_fake/stats").json()["requests"] == 4, "four upstream")
            httpx.post(fake.url + "/_fake/gates/four")
            assert [f.result().status_code for f in held] == [200] * 4
    finally:
        gw.stop()


def test_no_way_out_of_the_pipeline_keeps_its_intake_slot(fake: Service, redis_url: str, tmp_path: Path) -> None:
    # One slot, and a request that cannot get it within 3 s is shed with 503: had any of these requests
    # kept its slot, the last two would be 503s instead of the plan's 429s.
    gw = start_gateway(one_at_a_time({"requests_per_minute": 5}), env(fake, redis_url), tmp=tmp_path)
    try:
        assert post(gw.url, fake={"status": 500}).status_code >= 500  # the upstream's error
        assert post(gw.url, fake={"status": 401}).status_code == 502  # the upstream refused the key
        assert post(gw.url, stream=True).status_code == 200  # a stream
        with httpx.stream("POST", gw.url + "/v1/images/generations", timeout=60,
                          json={"prompt": "x", "quality": "low", "stream": True, "fake": {"event_gap": 0.3}},
                          headers={"authorization": f"Bearer {KEY}"}) as gone:
            assert gone.status_code == 200  # a client that leaves mid-stream
        assert post(gw.url).status_code == 200
        # Refused at admission, inside the intake: the first proves the five above left it, the second the first.
        assert [post(gw.url).status_code for _ in range(2)] == [429, 429]
        assert metric(gw.url, 'gateway_admission_shed_total{reason="deadline"}') == 0
    finally:
        gw.stop()


def test_a_stalled_redis_fills_the_intake_line_then_sheds_with_retry_after(
        fake: Service, pausable_redis: RedisServer, tmp_path: Path) -> None:
    # One request in the intake (its admission hangs on the paused Redis), two wait in line, the rest shed.
    gw = start_gateway(one_at_a_time({"requests_per_minute": 1000}, admission_queue=2, admission_wait_seconds=60),
                       env(fake, pausable_redis.url), tmp=tmp_path)
    assert pausable_redis.proc is not None
    try:
        assert post(gw.url).status_code == 200
        pausable_redis.proc.send_signal(signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(burst, [gw.url], 20)
            wait_until(lambda: metric(gw.url, 'gateway_admission_shed_total{reason="queue_full"}') >= 17,
                       "sheds counted", 30)
            pausable_redis.proc.send_signal(signal.SIGCONT)
            results = pending.result()
        shed = [r for r in results if r.status_code == 503]
        assert len(shed) == 17 == metric(gw.url, 'gateway_admission_shed_total{reason="queue_full"}')
        assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "service_unavailable"
                   for r in shed)
        assert [r.status_code for r in results].count(200) == 3
    finally:
        gw.stop()


async def test_waiters_that_gave_up_do_not_pile_up_while_every_slot_is_stuck() -> None:
    intake = Intake(limit=1, max_waiting=10_000)
    await intake.enter(later())  # held for good, as behind a stalled Redis
    for _ in range(20):
        waiters = [asyncio.ensure_future(intake.enter(time.monotonic() + 0.01)) for _ in range(100)]
        done = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(d, Shed) and d.reason == "deadline" for d in done)
    assert intake.waiting == 0 and len(intake._waiters) <= 64 + 100  # not the 2,000 that gave up
