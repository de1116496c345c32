"""``gateway serve``: config errors at start, metrics summed over workers, connection limits (SPEC section 3)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

import gateway.http.server as server_module
from gateway.http.server import usable_cores
from tests.support.procs import (
    RedisServer,
    Service,
    free_port,
    running,
    start_fake_upstream,
    start_gateway,
    wait_until,
)

KEY = "sk-igw-test_server-cccccccccccccccc"
DORA = {"plans": {"default": {}}, "keys": [{"user": "dora", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}]}


def test_bad_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("redis:\n  on_unavailable: maybe\n")
    run = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port",
                          str(free_port())], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "redis.on_unavailable" in run.stderr and "'reject' or 'allow'" in run.stderr
    check = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)], capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 2 and "redis.on_unavailable" in check.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_on_a_separate_port_sum_all_workers(workers: int, redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    cfg = {"metrics": {"port": port}, **DORA}
    fake = start_fake_upstream("tt-server")
    with contextlib.ExitStack() as cleanup:  # a gateway that fails to start must not leave the fake running
        cleanup.callback(fake.stop)
        env = {"TTAPI_API_KEY": "tt-server", "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_url}
        gw = start_gateway(cfg, {**env, "PROMETHEUS_MULTIPROC_DIR": None}, workers=workers, tmp=tmp_path)
        cleanup.callback(gw.stop)
        for _ in range(6):
            r = httpx.post(gw.url + "/v1/images/generations", json={"prompt": "x", "quality": "low"},
                           headers={"authorization": f"Bearer {KEY}"})
            assert r.status_code == 200
        line = 'gateway_requests_total{model="gpt-image-1",route="/v1/images/generations",status="200"} 6.0'
        wait_until(lambda: line in httpx.get(f"http://127.0.0.1:{port}/metrics").text, "separate metrics port")
        assert 'gateway_usage_tokens_total{kind="output",model="gpt-image-1",team="",user="dora"} 1632.0' \
            in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        off = httpx.get(gw.url + "/metrics")  # kept off the API port
        assert off.status_code == 404 and off.json()["error"]["message"] == "Invalid URL (GET /metrics)"


# --- several workers: values in memory, written to the multiprocess files in batches -----------------

GENERATIONS = 'route="/v1/images/generations"'


def sample_values(families: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``gateway_*`` metric families by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families if f.name.startswith("gateway_")
            for s in f.samples}


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def relay(gw: Service, n: int) -> dict[str, int]:
    """``n`` generations, each on a new connection (spread over the workers); returns the usage they reported."""
    reported = {"input_text_tokens": 0, "output_tokens": 0, "images": 0}
    for i in range(n):
        r = httpx.post(gw.url + "/v1/images/generations", headers={"authorization": f"Bearer {KEY}"},
                       json={"prompt": "x" * (i + 1), "quality": ("low", "medium")[i % 2]})
        assert r.status_code == 200
        usage = r.json()["usage"]
        reported["input_text_tokens"] += usage["input_tokens_details"]["text_tokens"]
        reported["output_tokens"] += usage["output_tokens"]
        reported["images"] += len(r.json()["data"])
    return reported


def assert_counts(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], n: int,
                  reported: dict[str, int]) -> None:
    """Requests, both duration histograms and the usage counters all show exactly the ``n`` requests."""
    assert total(samples, "gateway_requests_total") == total(samples, "gateway_requests_total", status="200") == n
    for histogram in ("gateway_request_duration_seconds", "gateway_upstream_duration_seconds"):
        assert total(samples, histogram + "_count") == n
        buckets = sorted((float(dict(ls)["le"]), v) for (name, ls), v in samples.items() if name == histogram
                         + "_bucket")
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and counts[-1] == n and buckets[-1][0] == float("inf")
        assert total(samples, histogram + "_sum") > 0
    for kind, field in (("input_text", "input_text_tokens"), ("output", "output_tokens")):
        assert total(samples, "gateway_usage_tokens_total", kind=kind, user="dora") == reported[field] > 0
    assert total(samples, "gateway_images_total", user="dora") == reported["images"] == n


@pytest.fixture(scope="module")
def server_fake() -> Iterator[Service]:
    fake = start_fake_upstream("tt-server")
    yield fake
    fake.stop()


def two_workers(cfg: dict[str, Any], fake: Service, redis_url: str, tmp_path: Path) -> Service:
    """A two-worker gateway (both started) in front of ``fake``, key KEY for user dora."""
    cfg = {**cfg, **DORA}
    gw = start_gateway(cfg, {"TTAPI_API_KEY": "tt-server", "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_url},
                       workers=2, tmp=tmp_path)
    try:
        wait_until(lambda: gw.log().count("Application startup complete.") == 2, "2 workers")
    except BaseException:
        gw.stop()
        raise
    return gw


def test_two_workers_show_every_request_on_metrics(server_fake: Service, redis_url: str, tmp_path: Path) -> None:
    n = 24
    with running(two_workers({}, server_fake, redis_url, tmp_path)) as gw:
        reported = relay(gw, n)
        scraped: dict[str, Any] = {}

        def all_counted() -> bool:  # each worker writes its figures every metrics.flush_seconds (1 s)
            scraped["samples"] = sample_values(text_string_to_metric_families(httpx.get(gw.url + "/metrics").text))
            return total(scraped["samples"], "gateway_requests_total") == n

        wait_until(all_counted, f"{n} requests on /metrics", timeout=1 + 20)
        assert_counts(scraped["samples"], n, reported)
        wait_until(lambda: total(sample_values(text_string_to_metric_families(httpx.get(gw.url + "/metrics").text)),
                                 "gateway_inflight_requests") == 0, "no request in flight")


def test_a_clean_stop_writes_every_count_to_the_files(server_fake: Service, redis_url: str, tmp_path: Path) -> None:
    """With a flush only once a minute, what the files hold after SIGTERM is the shutdown's flush."""
    n = 10
    gw = two_workers({"metrics": {"flush_seconds": 60}}, server_fake, redis_url, tmp_path)
    files = tmp_path / f"prom-{gw.port}"
    with running(gw):
        reported = relay(gw, n)
        # Not scraped (a scrape flushes the worker that answers it), and the first interval is a minute away.
        assert total(sample_values(MultiProcessCollector(None, path=str(files)).collect()),
                     "gateway_requests_total") == 0
    assert gw.proc is None  # stopped with SIGTERM, each worker ran its lifespan's end
    samples = sample_values(MultiProcessCollector(None, path=str(files)).collect())
    assert_counts(samples, n, reported)
    # Live-sum gauges of exited workers add nothing (each ended at 0 and wrote it).
    assert total(samples, "gateway_inflight_requests") == total(samples, "gateway_usage_pending_settlements") == 0


@pytest.mark.parametrize("separate_port", [False, True], ids=["api-port", "metrics-port"])
def test_metrics_token_is_required_when_set(separate_port: bool, redis_url: str, tmp_path: Path) -> None:
    token = "metrics-token-0123456789abcdef"
    port = free_port()
    cfg = {"metrics": {"port": port}} if separate_port else {}
    gw = start_gateway(cfg, {"REDIS_URL": redis_url, "GATEWAY_METRICS_TOKEN": token}, tmp=tmp_path)
    url = f"http://127.0.0.1:{port}/metrics" if separate_port else gw.url + "/metrics"
    with running(gw):
        if separate_port:
            wait_until(lambda: httpx.get(url).status_code == 401, "metrics port")
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": token},
                        {"authorization": f"Bearer {token}x"}):
            r = httpx.get(url, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            error = r.json()["error"]
            assert error["code"] == "invalid_api_key" and "GATEWAY_METRICS_TOKEN" in error["message"]
            assert "gateway_" not in r.text
        ok = httpx.get(url, headers={"authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and "gateway_upstream_errors_total{" in ok.text
    assert token not in gw.log()


def test_workers_default_to_the_usable_cores(redis_url: str, tmp_path: Path) -> None:
    """Without --workers (nor server.workers, nor GATEWAY_WORKERS), one worker per usable core."""
    port = free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(f"usage: {{spool_path: {tmp_path / 'usage.spool'}}}\n")
    gw = Service([sys.executable, "-m", "gateway", "serve", "--config", str(path), "--host", "127.0.0.1", "--port",
                  str(port)], port, {"REDIS_URL": redis_url, "GATEWAY_WORKERS": None,
                                     "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")})
    with running(gw.start()):
        expected = usable_cores()
        wait_until(lambda: gw.log().count("Application startup complete.") == expected, f"{expected} workers")
        assert ("Started parent process" in gw.log()) == (expected > 1)


@pytest.mark.parametrize(("cpu_max", "cap"), [("max 100000", None), ("150000 100000", 2), ("50000 100000", 1)])
def test_usable_cores_respect_a_cgroup_cpu_limit(cpu_max: str, cap: int | None, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    monkeypatch.setattr(server_module, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores() == (affinity if cap is None else min(affinity, cap))


# --- connections: header size, header time and body time (SPEC section 3) -----------------------------

HEAD = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n"
SAFETY_TIMEOUT = 60  # only so a broken server fails the test instead of hanging it


@pytest.fixture(scope="module")
def limited(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One gateway for the connection tests, its header and body timeouts lowered to 1 s."""
    cfg = {"server": {"header_timeout_seconds": 1, "body_timeout_seconds": 1, "body_min_bytes_per_second": 1000},
           **DORA}
    with running(start_gateway(cfg, {"REDIS_URL": redis_server.url}, tmp=tmp_path_factory.mktemp("limits"))) as gw:
        yield gw


def connect(gw: Service) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port))
    sock.settimeout(SAFETY_TIMEOUT)
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one response (bodies here have a content-length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ")[1]), body


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_4_mib_header_is_refused_and_the_server_stays_responsive(limited: Service) -> None:
    with connect(limited) as sock:
        try:
            sock.sendall(HEAD + b"X-Big: " + b"a" * (4 << 20) + b"\r\n\r\n")
            answer = read_until_closed(sock)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""  # refused before the client could send it all (the 431 may be lost to the reset)
    if answer:
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b'"code":"request_header_fields_too_large"' in answer
    assert httpx.get(limited.url + "/healthz", timeout=SAFETY_TIMEOUT).json() == {"status": "ok"}


def test_a_60_kib_header_passes(limited: Service) -> None:
    r = httpx.get(limited.url + "/healthz", headers={"x-big": "a" * (60 << 10)}, timeout=SAFETY_TIMEOUT)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_keep_alive_serves_several_requests_and_each_head_is_limited(limited: Service) -> None:
    with connect(limited) as sock:
        for _ in range(3):
            sock.sendall(HEAD + b"\r\n")
            assert read_response(sock) == (200, b'{"status":"ok"}')
        # Headers near the limit and a body in one send: the body is read as a body, not as headers.
        body = b"x" * (200 << 10)
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: gateway\r\nX-Big: " + b"a" * (60 << 10)
                     + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert read_response(sock)[0] == 401
        sock.sendall(HEAD + b"\r\n")
        assert read_response(sock) == (200, b'{"status":"ok"}')
        # A later request on the same connection has the same limit.
        sock.sendall(HEAD + b"X-Big: " + b"a" * (70 << 10) + b"\r\n\r\n")
        status, body = read_response(sock)
        assert status == 431 and b"request_header_fields_too_large" in body
        assert read_until_closed(sock) == b""


@pytest.mark.parametrize("request_head", [HEAD + b"Idempotency-Key: a\x7fb\r\n\r\n", b"GARBAGE\r\n\r\n"],
                         ids=["control character in a header", "no request line"])
def test_a_request_the_parser_refuses_gets_an_openai_shaped_400(limited: Service, request_head: bytes) -> None:
    with connect(limited) as sock:
        sock.sendall(request_head)
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    error = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_value", None)


def test_half_sent_headers_are_closed_by_the_server(limited: Service) -> None:
    with connect(limited) as sock:
        sock.sendall(HEAD)  # no blank line: the headers never end
        answer = read_until_closed(sock)  # returns once the server has closed the connection
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]


def test_a_silent_connection_is_closed_by_the_server(limited: Service) -> None:
    with connect(limited) as sock:
        assert read_until_closed(sock) == b""


def test_a_kept_alive_connection_that_starts_a_request_and_stalls_is_closed(limited: Service) -> None:
    with connect(limited) as sock:
        sock.sendall(HEAD + b"\r\n")
        assert read_response(sock)[0] == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")


BODY_HEAD = (b"POST /v1/images/generations HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer " + KEY.encode()
             + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n")


def timeout_error(answer: bytes) -> dict[str, Any]:
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    error: dict[str, Any] = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_timeout")
    return error


def test_a_body_that_stops_arriving_gets_408_and_the_connection_closes(limited: Service) -> None:
    with connect(limited) as sock:
        sock.sendall(BODY_HEAD % 1_000_000 + b"x" * 100_000)  # a tenth of it, then silence
        answer = read_until_closed(sock)
    assert "No request body bytes arrived" in timeout_error(answer)["message"]
    assert httpx.get(limited.url + "/healthz", timeout=SAFETY_TIMEOUT).json() == {"status": "ok"}


def test_a_body_trickling_below_the_minimum_rate_is_cut(limited: Service) -> None:
    with connect(limited) as sock:
        sock.sendall(BODY_HEAD % 100_000)
        stop = threading.Event()

        def trickle() -> None:  # 20 bytes a second: never silent for long, far below 1,000 a second
            with contextlib.suppress(OSError):
                while not stop.wait(0.05):
                    sock.send(b" ")

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        try:
            answer = read_until_closed(sock)
        finally:
            stop.set()
            sender.join()
    assert "slower than 1000 bytes a second" in timeout_error(answer)["message"]


def test_a_slow_body_above_the_minimum_rate_is_read_whole(limited: Service) -> None:
    body = b"{" + b" " * 17_999  # not JSON: answered 400 once the gateway has read it all
    with connect(limited) as sock:
        sock.sendall(BODY_HEAD % len(body))
        for i in range(0, len(body), 1_500):  # 12 pieces 0.25 s apart: 3 s in all (the timeout is 1 s), 6 kB/s
            sock.sendall(body[i:i + 1_500])
            time.sleep(0.25)
        status, answer = read_response(sock)
    assert status == 400, answer
    assert orjson.loads(answer)["error"]["code"] == "invalid_value"
