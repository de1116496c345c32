"""Load generators: ``wrk`` for throughput (lean, C), aiohttp for streams and many slow requests.

Both share the machine's cores with the processes they measure; wrk runs one thread to
take as little as it can.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

WRK = shutil.which("wrk") or "wrk"
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50: float  # seconds
    p99: float
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    raw: str = ""

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def error_text(self) -> str:
        """``0``, or what went wrong: ``3 non-2xx, 1 timeout``."""
        if not self.errors:
            return "0"
        parts = [f"{self.non_2xx} non-2xx"] if self.non_2xx else []
        return ", ".join(parts + [f"{n} {kind}" for kind, n in self.socket_errors.items()])


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def wrk_script(body: Mapping[str, Any], headers: Mapping[str, str]) -> str:
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(json.dumps(body))}"]
    lines += [f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in headers.items()]
    return "\n".join(lines) + "\n"


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m[1]) * _UNITS[m[2]]


def parse_wrk(out: str) -> WrkResult:
    done = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if done is None or rps is None:
        raise RuntimeError(f"could not parse wrk output:\n{out}")
    pct = {m[1]: _seconds(m[2]) for m in re.finditer(r"^\s+(\d+)%\s+([\d.]+\w+)", out, re.M)}
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = {}
    if sock:
        socket_errors = {k: int(v) for k, v in zip(("connect", "read", "write", "timeout"), sock.groups(),
                                                   strict=True) if int(v)}
    return WrkResult(requests=int(done[1]), seconds=_seconds(done[2]), rps=float(rps[1]),
                     p50=pct.get("50", float("nan")), p99=pct.get("99", float("nan")),
                     non_2xx=int(non_2xx[1]) if non_2xx else 0, socket_errors=socket_errors, raw=out)


def run_wrk(url: str, body: Mapping[str, Any], headers: Mapping[str, str], *, connections: int,
            duration: float, timeout: float = 10.0, threads: int = 1) -> WrkResult:
    """POST ``body`` to ``url`` over ``connections`` keep-alive connections for ``duration`` s."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-wrk-", delete=False) as f:
        f.write(wrk_script(body, {"Content-Type": "application/json", **headers}))
        script = f.name
    try:
        cmd = [WRK, f"-t{threads}", f"-c{connections}", f"-d{max(round(duration), 1)}s",
               f"--timeout={max(int(timeout), 1)}s", "--latency", "-s", script, url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + timeout + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
        return parse_wrk(proc.stdout)
    finally:
        Path(script).unlink(missing_ok=True)


# --- aiohttp: streams and many slow requests -------------------------------------------------------


@dataclass
class StreamTiming:
    first_event: list[float] = field(default_factory=list)  # seconds to the end of the first event
    total: list[float] = field(default_factory=list)  # seconds to the end of the stream
    events: Counter[int] = field(default_factory=Counter)  # events per stream -> streams
    statuses: Counter[int] = field(default_factory=Counter)

    @property
    def median_first(self) -> float:
        return statistics.median(self.first_event) if self.first_event else float("nan")

    @property
    def median_total(self) -> float:
        return statistics.median(self.total) if self.total else float("nan")


async def time_streams(url: str, body: Mapping[str, Any], headers: Mapping[str, str], count: int,
                       warmup: int = 2) -> StreamTiming:
    """``count`` streamed requests one after another: time to the first whole event and to the end."""
    result = StreamTiming()
    data = json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **headers}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for i in range(warmup + count):
            started = time.perf_counter()
            first = None
            parts: list[bytes] = []
            async with session.post(url, data=data, headers=hdrs) as resp:
                async for chunk in resp.content.iter_any():
                    parts.append(chunk)
                    if first is None and b"\n\n" in b"".join(parts[-2:]):
                        first = time.perf_counter() - started
                end = time.perf_counter() - started
                status = resp.status
            if i < warmup:
                continue
            result.statuses[status] += 1
            result.events[b"".join(parts).count(b"\n\n")] += 1
            if first is not None:
                result.first_event.append(first)
                result.total.append(end)
    return result


@dataclass
class SlowResult:
    concurrency: int
    statuses: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0  # until the last request finished
    samples: dict[str, str] = field(default_factory=dict)  # status -> the first such body (failures only)
    latencies: list[float] = field(default_factory=list)  # seconds, of each request that got a 200

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")


async def slow_requests(url: str, body: Mapping[str, Any], headers: Mapping[str, str], concurrency: int,
                        limit_seconds: float = 120.0) -> SlowResult:
    """``concurrency`` requests sent at once (one connection each); counts their statuses."""
    result = SlowResult(concurrency)
    data = json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **headers}
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=limit_seconds)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> None:
            sent = time.perf_counter()
            try:
                async with session.post(url, data=data, headers=hdrs) as resp:
                    answer = await resp.read()
                    result.statuses[str(resp.status)] += 1
                    if resp.status == 200:
                        result.latencies.append(time.perf_counter() - sent)
                    else:
                        result.samples.setdefault(str(resp.status), answer[:300].decode(errors="replace"))
            except (aiohttp.ClientError, TimeoutError) as exc:
                result.statuses[type(exc).__name__] += 1
                result.samples.setdefault(type(exc).__name__, str(exc)[:300])

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - started
    return result
