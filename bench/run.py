"""``python -m bench.run`` (``make bench``): the gateway against the fake upstream, in one run.

Starts its own redis-server, fake upstream and gateway (a plan whose every limit is set,
high enough never to refuse, so admission and settlement run), and measures the fake
directly and through the gateway in the same run:

- c1:     small non-stream requests one at a time (wrk -c1): the p50 the gateway adds;
- rps:    small non-stream requests at 64 concurrent (wrk): req/s, p50, p99;
- ttfb:   streamed requests (partial_images 2, an event gap): median time to the first event;
- big:    ~3 MB JSON answers at 8 concurrent (wrk): MB/s, p50, gateway peak RSS;
- burst:  1,500 requests held 3 s, then 5,000 held 10 s, all sent at once (bench/burst.py):
          how many succeed, p50, gateway RSS before, peak and after.

Unpinned by default, as users run it; ``--pin`` puts the gateway on a core of its own.

Prints a table with the ratios through/direct and rewrites this run's section of
bench/RESULTS.md. Not a pass/fail test. ``--profile`` adds a py-spy profile of the
gateway worker under the rps load (needs ``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import burst, load, profile, report
from bench.procs import (
    OUT_DIR,
    CpuPlan,
    OtherLoad,
    RssSampler,
    children_cpu_seconds,
    cpu_plan,
    cpu_seconds,
    raise_fd_limit,
    rss_bytes,
)
from bench.stack import SMALL, Stack, running_stack

PHASES = ("c1", "rps", "ttfb", "big", "burst")
# --- phases -----------------------------------------------------------------------------------------


@dataclass
class Results:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # what, direct, through, ratio
    notes: list[str] = field(default_factory=list)
    profile: str = ""

    def add(self, what: str, direct: str, through: str, ratio: str = "-") -> None:
        self.rows.append((what, direct, through, ratio))

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


@dataclass
class Pair:
    """wrk against the fake directly and through the gateway."""

    direct: load.WrkResult
    through: load.WrkResult
    peak_rss: int  # the gateway's, during the measurement through it
    redis_per_request: dict[str, float]  # Redis commands (also those run inside scripts) per request
    cpu: dict[str, dict[str, float]]  # target -> process -> cores used (1.0: one core busy)


def _measure(stack: Stack, target: str, url: str, headers: dict[str, str], body: dict[str, Any],
             connections: int, args: argparse.Namespace, timeout: float,
             sampler: RssSampler | None) -> tuple[load.WrkResult, dict[str, float]]:
    pids = {"gateway": stack.gateway.pid, "fake upstream": stack.fake.pid, "redis": stack.redis.pid}
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    wrk_before = children_cpu_seconds()
    started = time.monotonic()
    with sampler or contextlib.nullcontext():
        result = load.run_wrk(url, body, headers, connections=connections, duration=args.duration,
                              timeout=timeout)
    elapsed = time.monotonic() - started
    cpu = {name: (cpu_seconds(pid) - cpu_before[name]) / elapsed for name, pid in pids.items()}
    cpu["wrk"] = (children_cpu_seconds() - wrk_before) / elapsed
    if target == "direct":
        cpu.pop("gateway")
        cpu.pop("redis")
    return result, cpu


def _wrk_pair(stack: Stack, body: dict[str, Any], connections: int, args: argparse.Namespace, timeout: float,
              sample_rss: bool = False) -> Pair:
    """wrk direct, then through (each after a warm-up)."""
    out: dict[str, load.WrkResult] = {}
    cpu: dict[str, dict[str, float]] = {}
    sampler = RssSampler(stack.gateway.pid) if sample_rss else None
    per_request: dict[str, float] = {}
    for name, url, headers in stack.targets():
        if args.warmup:
            load.run_wrk(url, body, headers, connections=connections, duration=args.warmup, timeout=timeout)
        calls_before = stack.redis_calls() if name == "through" else Counter()
        out[name], cpu[name] = _measure(stack, name, url, headers, body, connections, args, timeout,
                                        sampler if name == "through" else None)
        if name == "through":
            calls = stack.redis_calls() - calls_before
            calls.pop("info", None)
            per_request = {k: v / max(out[name].requests, 1) for k, v in calls.items()}
        r = out[name]
        print(f"  {name:8s} {r.rps:9.0f} req/s  p50 {r.p50 * 1000:8.2f} ms  p99 {r.p99 * 1000:8.2f} ms  "
              f"errors {r.error_text()}  CPU {_cpu_text(cpu[name])}", flush=True)
    return Pair(out["direct"], out["through"], sampler.peak if sampler else 0, per_request, cpu)


def _cpu_text(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {100 * share:.0f}%" for name, share in cpu.items())


def _add_latency(res: Results, what: str, direct: float, through: float) -> None:
    res.add(what, report.fmt_num(direct, "ms"), report.fmt_num(through, "ms"), report.ratio(through, direct))


def phase_rps(stack: Stack, args: argparse.Namespace, res: Results) -> None:
    print(f"rps: small non-stream requests, {args.concurrency} concurrent, {args.duration:g} s", flush=True)
    pair = _wrk_pair(stack, SMALL, args.concurrency, args, timeout=10)
    d, t, per_request = pair.direct, pair.through, pair.redis_per_request
    label = f"small JSON, {args.concurrency} concurrent"
    res.add(f"{label}: req/s", report.fmt_num(d.rps, "req/s"), report.fmt_num(t.rps, "req/s"),
            report.ratio(t.rps, d.rps))
    _add_latency(res, f"{label}: p50", d.p50, t.p50)
    _add_latency(res, f"{label}: p99", d.p99, t.p99)
    res.add(f"{label}: errors", d.error_text(), t.error_text())
    ranked = sorted(per_request.items(), key=lambda kv: -kv[1])
    calls = ", ".join(f"{k} {v:.2f}" for k, v in ranked if v >= 0.01)
    scripts = sum(v for k, v in per_request.items() if k in ("evalsha", "eval", "fcall"))
    res.note(f"Redis per gateway request (rps phase): {scripts:.2f} script calls (EVALSHA); all commands, also "
             f"those run inside scripts: {calls or 'none'}")
    res.note(f"CPU during the rps measurement (100% = one core of {os.cpu_count()}): direct: "
             f"{_cpu_text(pair.cpu['direct'])}; through: {_cpu_text(pair.cpu['through'])}")
    if t.rps < 1000:
        res.note(f"through the gateway {t.rps:,.0f} req/s: below the 1,000 req/s target for one worker")


def phase_c1(stack: Stack, args: argparse.Namespace, res: Results) -> None:
    print(f"c1: small non-stream requests one at a time, {args.duration:g} s", flush=True)
    pair = _wrk_pair(stack, SMALL, 1, args, timeout=10)
    d, t = pair.direct, pair.through
    _add_latency(res, "small JSON, 1 at a time: p50", d.p50, t.p50)
    res.add("small JSON, 1 at a time: req/s", report.fmt_num(d.rps, "req/s"), report.fmt_num(t.rps, "req/s"),
            report.ratio(t.rps, d.rps))
    res.note(f"concurrency 1: the gateway adds {(t.p50 - d.p50) * 1000:.2f} ms to the p50")


def phase_ttfb(stack: Stack, args: argparse.Namespace, res: Results) -> None:
    gap = args.event_gap
    print(f"ttfb: {args.streams} streams in a row (partial_images 2, event gap {gap:g} s)", flush=True)
    body = {**SMALL, "stream": True, "partial_images": 2, "fake": {"event_gap": gap}}
    timings = {}
    for name, url, headers in stack.targets():
        timings[name] = asyncio.run(load.time_streams(url, body, headers, args.streams))
        t = timings[name]
        print(f"  {name:8s} first event {t.median_first * 1000:8.2f} ms  "
              f"end {t.median_total * 1000:8.1f} ms  statuses {dict(t.statuses)}  "
              f"events/stream {dict(t.events)}", flush=True)
    d, t = timings["direct"], timings["through"]
    res.add(f"stream: time to first event (median of {args.streams})", report.fmt_num(d.median_first, "ms"),
            report.fmt_num(t.median_first, "ms"), report.ratio(t.median_first, d.median_first))
    res.add("stream: time to last byte (median)", report.fmt_num(d.median_total, "ms"),
            report.fmt_num(t.median_total, "ms"), report.ratio(t.median_total, d.median_total))
    res.add("stream: 200s, events per stream", f"{d.statuses.get(200, 0)}/{args.streams}, {_mode(d.events)}",
            f"{t.statuses.get(200, 0)}/{args.streams}, {_mode(t.events)}")
    if t.events != d.events or t.statuses != d.statuses:
        res.note(f"streams differ: direct {dict(d.statuses)} {dict(d.events)}, "
                 f"through {dict(t.statuses)} {dict(t.events)}")
    res.note(f"stream first event: gateway adds {(t.median_first - d.median_first) * 1000:.2f} ms (median)")


def _mode(counter: Counter[int]) -> str:
    return str(counter.most_common(1)[0][0]) if counter else "-"


def phase_big(stack: Stack, args: argparse.Namespace, res: Results) -> None:
    pad = args.big_pad
    print(f"big: ~{pad * 4 / 3 / 1e6:.1f} MB JSON answers, {args.big_concurrency} concurrent, "
          f"{args.duration:g} s", flush=True)
    body = {**SMALL, "fake": {"pad_bytes": pad}}
    before = rss_bytes(stack.gateway.pid)
    pair = _wrk_pair(stack, body, args.big_concurrency, args, timeout=60, sample_rss=True)
    d, t, peak = pair.direct, pair.through, pair.peak_rss
    label = f"~{pad * 4 / 3 / 1e6:.0f} MB JSON, {args.big_concurrency} concurrent"
    res.add(f"{label}: req/s", report.fmt_num(d.rps, "req/s"), report.fmt_num(t.rps, "req/s"),
            report.ratio(t.rps, d.rps))
    megabytes = pad * 4 / 3 / 1e6  # the base64 image dominates the answer
    res.add(f"{label}: MB/s", f"{d.rps * megabytes:,.0f} MB/s", f"{t.rps * megabytes:,.0f} MB/s",
            report.ratio(t.rps, d.rps))
    _add_latency(res, f"{label}: p50", d.p50, t.p50)
    res.add(f"{label}: errors", d.error_text(), t.error_text())
    res.add(f"{label}: gateway RSS before / peak", "-", f"{before / 2**20:.0f} / {peak / 2**20:.0f} MiB")
    res.note(f"CPU during the big measurement: direct: {_cpu_text(pair.cpu['direct'])}; "
             f"through: {_cpu_text(pair.cpu['through'])}")


def run_profile(stack: Stack, args: argparse.Namespace, res: Results) -> None:
    url, headers = stack.through
    pid = stack.busiest_worker()
    if args.profile == "big":
        body, connections, timeout = {**SMALL, "fake": {"pad_bytes": args.big_pad}}, args.big_concurrency, 60
    else:
        body, connections, timeout = SMALL, 1 if args.profile == "c1" else args.concurrency, 10
    print(f"profile: py-spy on gateway worker {pid}, {args.profile} load, {args.duration:g} s", flush=True)
    res.profile = f"under the {args.profile} load:\n" + profile.profile_under_load(
        pid, lambda: load.run_wrk(url, body, headers, connections=connections, duration=args.duration + 2,
                                  timeout=timeout),
        duration=args.duration, out_dir=OUT_DIR)


def phase_burst(stack: Stack, args: argparse.Namespace, res: Results) -> None:
    burst.phase_burst(stack, args, res, SMALL)


PHASE_FUNCS: dict[str, Callable[[Stack, argparse.Namespace, Results], None]] = {
    "c1": phase_c1, "rps": phase_rps, "ttfb": phase_ttfb, "big": phase_big, "burst": phase_burst}


# --- main ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PHASES), help="comma-separated subset of the phases")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk measurement (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="wrk warm-up seconds before each (2)")
    parser.add_argument("--workers", type=int, default=1, help="gateway workers (default 1)")
    parser.add_argument("--concurrency", type=int, default=64, help="rps: connections (default 64)")
    parser.add_argument("--streams", type=int, default=20, help="ttfb: streamed requests (default 20)")
    parser.add_argument("--event-gap", type=float, default=0.2, help="ttfb: seconds between events (0.2)")
    parser.add_argument("--bursts", default="1500x3,5000x10",
                        help="burst: REQUESTSxSECONDS_HELD, comma-separated (1500x3,5000x10)")
    parser.add_argument("--big-concurrency", type=int, default=8, help="big: connections (default 8)")
    parser.add_argument("--big-pad", type=int, default=2_200_000, help="big: image bytes (default 2.2 MB)")
    parser.add_argument("--profile", nargs="?", const="rps", choices=("rps", "big", "c1"),
                        help="also profile the gateway worker (py-spy) under the rps (default), big or c1 load")
    parser.add_argument("--pin", action="store_true",
                        help="pin the gateway to its own CPUs and the rest to the others (default: unpinned, "
                             "as users run it)")
    parser.add_argument("--label", default="", help="a name for this run's section in RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    args.command = " ".join(["python -m bench.run", *(sys.argv[1:] if argv is None else argv)])
    wanted = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = wanted - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    # Always in this order: bursts last, as they leave thousands of idle upstream connections pooled
    # (10 s keep-alive) and reusing those cold connections slows the big phase down 3-4x.
    args.phases = [p for p in PHASES if p in wanted]
    return args


def render(args: argparse.Namespace, res: Results, started: float, revision: str, when: str,
           plan: CpuPlan) -> str:
    title = f"## Gateway run {when}, {args.workers} worker{'s' if args.workers != 1 else ''}"
    if args.label:
        title += f" ({args.label})"
    lines = [title, "", f"- command: `{args.command}`",
             f"- gateway revision: {revision}; run took {time.monotonic() - started:.0f} s",
             *report.machine_lines(), f"- CPUs: {plan.describe()}", "",
             report.markdown_table(("measurement", "direct (fake)", "through gateway", "through/direct"),
                                   res.rows)]
    if res.notes:
        lines += ["", *(f"- {n}" for n in res.notes)]
    if res.profile:
        lines += ["", "Profile of the gateway worker (py-spy):", "",
                  "```", res.profile, "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    when = report.now_utc().strftime("%Y-%m-%d %H:%M UTC")
    raise_fd_limit()
    plan = cpu_plan(args.workers, args.pin)
    revision = report.git_revision()
    res = Results()
    print(f"bench: gateway {revision}, {args.workers} worker(s), phases {','.join(args.phases)}", flush=True)
    print(f"CPUs: {plan.describe()}", flush=True)
    with OtherLoad() as others:
        with running_stack(args.workers, plan.subject) as stack:
            for phase in args.phases:
                if phase == "burst" and args.profile:  # before the bursts, as the big phase
                    run_profile(stack, args, res)
                PHASE_FUNCS[phase](stack, args, res)
            if args.profile and "burst" not in args.phases:
                run_profile(stack, args, res)
            log = stack.gateway.log_path.read_text(errors="replace")
    res.note(f"other processes on the machine kept {100 * others.share():.0f}% of a core busy on average during "
             "the run (above a few %, the figures are disturbed)")
    problems = [line for line in log.splitlines() if any(w in line for w in ("Traceback", "ERROR", "WARNING"))]
    if problems:
        res.note(f"gateway log: {len(problems)} warning/error lines, first: {problems[0].strip()[:200]} "
                 f"(bench/out/gateway.log)")
    print()
    print(report.text_table(("measurement", "direct", "through", "through/direct"), res.rows))
    for note in res.notes:
        print(f"- {note}")
    if res.profile:
        print("\n" + res.profile)
    if not args.no_write:
        key = f"run {when[:10]} {revision} workers={args.workers} only={','.join(args.phases)}"
        if args.label:
            key += f" label={args.label}"
        report.upsert_section(key, render(args, res, started, revision, when, plan))
        print(f"\nwritten to {report.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
