"""The burst phase: thousands of slow requests sent at once, direct and through, in one run.

Each burst (default ``1500x3,5000x10``: 1,500 requests the fake holds 3 s, then 5,000 held
10 s) is sent straight to the fake upstream, then through the gateway, one connection per
request. Reported: how many succeeded, the p50 of the successful ones, the time until the
last one finished, and the gateway's RSS before, at its peak and after. Issue 9's targets:
every request succeeds, p50 within 1 s of direct, RSS under 600 MB at 5,000 in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench import load, report
from bench.procs import RssSampler, rss_bytes


def parse_bursts(text: str) -> list[tuple[int, float]]:
    """``1500x3,5000x10`` -> [(1500, 3.0), (5000, 10.0)]."""
    out = []
    for part in text.split(","):
        count, _, hold = part.strip().partition("x")
        out.append((int(count), float(hold)))
    return out


def phase_burst(stack: Any, args: argparse.Namespace, res: Any, body: dict[str, Any]) -> None:
    """Every burst of ``args.bursts``, direct then through; rows and notes into ``res``."""
    for n, hold in parse_bursts(args.bursts):
        _one_burst(stack, res, {**body, "fake": {"latency": hold}}, n, hold)


def _one_burst(stack: Any, res: Any, body: dict[str, Any], n: int, hold: float) -> None:
    print(f"burst: {n} requests at once, held {hold:g} s by the fake", flush=True)
    url, headers = stack.direct
    direct = asyncio.run(load.slow_requests(url, body, headers, n))
    print(f"  direct   {direct.ok}/{n} OK, p50 {direct.p50:.2f} s, all done in {direct.seconds:.1f} s  "
          f"{dict(direct.statuses)}", flush=True)
    url, headers = stack.through
    before, fds_before = rss_bytes(stack.gateway.pid), stack.fds()
    with RssSampler(stack.gateway.pid) as sampler:
        through = asyncio.run(load.slow_requests(url, body, headers, n))
    time.sleep(1.0)  # let closed connections and finished tasks go before reading "after"
    after, fds_after = rss_bytes(stack.gateway.pid), stack.fds()
    print(f"  through  {through.ok}/{n} OK, p50 {through.p50:.2f} s, all done in {through.seconds:.1f} s  "
          f"{dict(through.statuses)}  RSS {before / 2**20:.0f} -> peak {sampler.peak / 2**20:.0f} -> "
          f"{after / 2**20:.0f} MiB  fds {fds_before} -> {fds_after}", flush=True)
    label = f"burst {n:,} x {hold:g} s"
    res.add(f"{label}: OK", f"{direct.ok}/{n}", f"{through.ok}/{n}")
    res.add(f"{label}: p50", report.fmt_num(direct.p50, "s"), report.fmt_num(through.p50, "s"),
            report.ratio(through.p50, direct.p50))
    res.add(f"{label}: time until all done", report.fmt_num(direct.seconds, "s"),
            report.fmt_num(through.seconds, "s"), report.ratio(through.seconds, direct.seconds))
    res.add(f"{label}: gateway RSS before / peak / after", "-",
            f"{before / 2**20:.0f} / {sampler.peak / 2**20:.0f} / {after / 2**20:.0f} MiB")
    res.note(f"{label}: p50 through - direct = {through.p50 - direct.p50:+.2f} s; gateway peak RSS grows "
             f"{(sampler.peak - before) / n / 1024:.0f} KiB per request in flight; open fds {fds_before} "
             f"before, {fds_after} after")
    for name, result in (("direct", direct), ("through", through)):
        if result.ok != n:
            res.note(f"{label} {name}: only {result.ok}/{n} OK: {dict(result.statuses)}; first bodies: "
                     + "; ".join(f"{k}: {v}" for k, v in result.samples.items()))
