"""``python -m bench.metrics_values``: what a relayed request's metric updates cost, by where the values live.

    python -m bench.metrics_values [--requests 20000] [--rounds 5]

One request's updates as the worker makes them (RequestIdMiddleware's in-flight gauge, Meter.finish's
counters and two histograms: 9 calls, 13 value updates) on a fresh ``Metrics`` per variant:

- ``memory``: prometheus-client's in-process values (one worker without ``metrics.port``);
- ``files``: its ``MultiProcessValue``, a write to the worker's mmap'd file per update (before);
- ``buffered``: gateway/metering/buffered_values.py, in memory and flushed once a second; the
  flush's cost per request is added from a timed flush of one request's dirty values, divided by
  the requests a worker serves in a second (``--rate``).

Rounds alternate the variants; the minimum and median are printed (CPU time of this process per
request: on a shared machine the minimum is the least disturbed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

VARIANTS = ("memory", "files", "buffered")
ROUTE, MODEL = "/v1/images/generations", "gpt-image-1"


def one_request(m: Any) -> Callable[[], None]:
    """The metric updates of one relayed, metered request (gateway/http/middleware.py, metering/meter.py)."""

    def run() -> None:
        inflight = m.child(m.inflight, ROUTE)
        inflight.inc()
        m.child(m.requests, ROUTE, MODEL, "200").inc()
        m.child(m.request_duration, ROUTE, MODEL, "false").observe(0.0123)
        m.child(m.upstream_duration, MODEL, "false", "ok").observe(0.0101)
        who = m.who("alice", None)
        m.child(m.tokens, *who, MODEL, "input_text").inc(12)
        m.child(m.tokens, *who, MODEL, "output").inc(272)
        m.child(m.images, *who, MODEL).inc(1)
        m.child(m.cost, *who, MODEL).inc(0.011)
        inflight.dec()

    return run


def value_classes(directory: str) -> dict[str, Any]:
    from prometheus_client import values

    from gateway.metering.buffered_values import buffered_value_class

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # after gateway.metering.metrics installed nothing
    return {"memory": values.MutexValue, "files": values.MultiProcessValue(), "buffered": buffered_value_class()}


def cpu_us_per_request(run: Callable[[], None], requests: int) -> float:
    start = time.process_time()
    for _ in range(requests):
        run()
    return (time.process_time() - start) / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_values", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rate", type=float, default=2_000, help="requests a worker serves a second (flush share)")
    args = parser.parse_args()
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from prometheus_client import values

    from gateway.metering.metrics import Metrics

    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as directory:
        classes = value_classes(directory)
        runs = {}
        for name, cls in classes.items():
            values.ValueClass = cls  # each Metrics' children take the class current at their creation
            runs[name] = one_request(Metrics())
            runs[name]()  # children created outside the timing
        buffered = classes["buffered"]
        buffered.flush()
        timings: dict[str, list[float]] = {name: [] for name in VARIANTS}
        flushes = []
        for _ in range(args.rounds):
            for name in VARIANTS:
                timings[name].append(cpu_us_per_request(runs[name], args.requests))
            start = time.perf_counter()
            buffered.flush()  # one second's worth of requests dirty the same 13 values
            flushes.append((time.perf_counter() - start) * 1e6)
    flush_us = statistics.median(flushes)
    print(f"{args.requests:,} requests x {args.rounds} rounds, CPU us per request (min, median):")
    for name in VARIANTS:
        extra = f"  + a flush of {flush_us:.1f} us per {args.rate:,.0f} requests" if name == "buffered" else ""
        print(f"  {name:9} {min(timings[name]):6.2f} {statistics.median(timings[name]):6.2f}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
