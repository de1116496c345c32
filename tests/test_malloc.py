"""A serving worker's allocator keeps big buffers' memory instead of faulting fresh pages in for each answer."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gateway import malloc
from tests.support.procs import RedisServer, Service, running, start_fake_upstream, start_gateway

# Eight answers of ~3 MB in flight, each arriving in 256 KiB pieces, the oldest freed as the next comes:
# what relaying big answers does to the allocator. Prints the page faults the churn caused.
CHURN = textwrap.dedent("""
    import resource, sys
    from gateway.malloc import tune_malloc
    tuned = tune_malloc() if sys.argv[1] == "tuned" else None
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ring = [[] for _ in range(8)]
    for i in range(400):
        if i == 80:
            start = faults()  # after the warm-up
        ring[i % 8] = [bytes([i % 251]) * (256 * 1024) for _ in range(12)]
    print(tuned, faults() - start)
""")


def churn_faults(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True,
                         env=env, cwd=Path(__file__).parents[1]).stdout.split()
    return out[0], int(out[1])


def test_big_buffers_reuse_the_heap_once_tuned() -> None:
    untuned_result, untuned = churn_faults("default")
    tuned_result, tuned = churn_faults("tuned")
    assert untuned_result == "None" and tuned_result == "True"
    # 320 rounds of 3 MB: with glibc's defaults 26,496 page faults here, tuned none.
    assert untuned > 10_000, untuned
    assert tuned < untuned / 20, (tuned, untuned)


def test_an_operators_malloc_variables_are_left_alone() -> None:
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "1048576"}
    assert churn_faults("tuned", env)[0] == "False"
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}
    assert churn_faults("tuned", env)[0] == "False"
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}  # not the allocator's: tuned
    assert churn_faults("tuned", env)[0] == "True"
    assert malloc.MMAP_THRESHOLD_BYTES == 1 << 20 and malloc.TRIM_THRESHOLD_BYTES == 64 << 20


KEY = "sk-igw-test_malloc-dddddddddddddddd"
PAD = 2 * 1024 * 1024  # the fake's image padding: answers of ~2.8 MB of base64


@pytest.fixture(scope="module")
def big_gateway(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    fake = start_fake_upstream("tt-malloc")
    cfg = {"plans": {"default": {}}, "keys": [{"user": "erin", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}]}
    env = {"TTAPI_API_KEY": "tt-malloc", "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_server.url}
    with running(fake), running(start_gateway(cfg, env, tmp=tmp_path_factory.mktemp("malloc"))) as gw:
        yield gw


def worker_faults(gw: Service) -> int:
    assert gw.proc is not None  # one worker: uvicorn serves in the started process itself
    return int(Path(f"/proc/{gw.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def relay_big(gw: Service, n: int) -> int:
    """``n`` big generations, 8 at a time; the bytes the client got."""
    def one(client: httpx.Client) -> int:
        r = client.post(gw.url + "/v1/images/generations", headers={"authorization": f"Bearer {KEY}"},
                        json={"prompt": "a big one", "fake": {"pad_bytes": PAD}}, timeout=60)
        assert r.status_code == 200 and len(r.json()["data"][0]["b64_json"]) > PAD
        return len(r.content)

    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        return sum(pool.map(lambda _: one(client), range(n)))


def test_big_answers_do_not_fault_the_workers_pages_in_again(big_gateway: Service) -> None:
    relay_big(big_gateway, 12)  # warm-up: the heap grows to what eight answers in flight need
    before = worker_faults(big_gateway)
    relayed = relay_big(big_gateway, 40)
    per_answer = (worker_faults(big_gateway) - before) / 40
    # Re-faulting a big answer's buffers costs the worker a quarter of its CPU (bench/RESULTS.md). Tuned,
    # a worker faults pages in only as its heap grows: 0.2 an answer here; untuned 58-71.
    assert relayed > 40 * PAD
    assert per_answer < 10, per_answer
