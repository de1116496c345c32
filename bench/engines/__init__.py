"""``python -m bench.engines``: which client engine relays image responses fastest.

One fake upstream; for each engine a minimal FastAPI relay (bench/engines/relay.py) under
uvicorn with one worker (uvloop, httptools); wrk POSTs small image requests at 64 and
512 concurrent connections, to the fake directly and through each relay, in one run.
Engines: httpx.AsyncClient, httpx2 (if installed), httpx's API over the aiohttp transport
(httpx-aiohttp, if installed: ``pip install httpx-aiohttp``, only for this benchmark),
aiohttp.ClientSession, aiohttp on bare Starlette (what FastAPI itself costs), and the floor
(bench/engines/floor.py: a bare HTTP/1.1 client, the least any engine could cost).
Writes the "Engine choice" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import dataclass
from urllib.error import URLError
from urllib.request import urlopen

from bench import load, report
from bench.procs import CpuPlan, OtherLoad, Proc, cpu_plan, free_port, raise_fd_limit, start_fake

UPSTREAM_KEY = "bench-upstream-key"
BODY = {"model": "gpt-image-1", "prompt": "a lighthouse at dusk", "size": "1024x1024", "quality": "low"}
REFERENCE = "aiohttp"


@dataclass(frozen=True)
class Target:
    key: str  # for --only
    name: str  # as in the table
    engine: str | None  # None: the fake directly
    framework: str = "fastapi"
    module: str | None = None  # must be importable, else skipped


TARGETS = (
    Target("direct", "fake upstream directly", None),
    Target("httpx", "httpx", "httpx", module="httpx"),
    Target("httpx2", "httpx2", "httpx2", module="httpx2"),
    Target("httpx-aiohttp", "httpx-aiohttp", "httpx-aiohttp", module="httpx_aiohttp"),
    Target("aiohttp", "aiohttp", "aiohttp", module="aiohttp"),
    Target("aiohttp-starlette", "aiohttp, Starlette instead of FastAPI", "aiohttp", framework="starlette",
           module="aiohttp"),
    Target("floor", "floor: bare HTTP/1.1 client (benchmark only)", "floor", module="httptools"),
)


def _ok(url: str) -> bool:
    try:
        with urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (OSError, URLError):
        return False


def start_relay(target: Target, upstream: str, cpus: set[int] | None) -> Proc:
    assert target.engine is not None
    port = free_port()
    name = f"relay-{target.engine}-{target.framework}"
    args = [sys.executable, "-m", "bench.engines.relay", "--engine", target.engine, "--framework",
            target.framework, "--port", str(port), "--upstream", upstream, "--key", UPSTREAM_KEY]
    proc = Proc(name, args, port, cpus=cpus)
    return proc.start(lambda: _ok(f"http://127.0.0.1:{port}/healthz"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each (default 2)")
    parser.add_argument("--concurrency", default="64,512", help="comma-separated connection counts")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure every cell this many times, rounds interleaved; report the median (3)")
    parser.add_argument("--only", default=",".join(t.key for t in TARGETS), help="comma-separated subset")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin the relay to its own CPU (pinned by default when there are 2+)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--label", default="",
                        help="a section of its own in RESULTS.md (keeps the unlabelled engine choice)")
    args = parser.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.targets = [t for t in TARGETS if t.key in {k.strip() for k in args.only.split(",")}]
    args.command = " ".join(["python -m bench.engines", *(sys.argv[1:] if argv is None else argv)])
    return args


def measure(args: argparse.Namespace, plan: CpuPlan) -> tuple[dict[str, dict[int, list[load.WrkResult]]],
                                                                list[str]]:
    """Every target at every level, ``args.rounds`` times over (rounds interleaved, not back to back)."""
    results: dict[str, dict[int, list[load.WrkResult]]] = {}
    skipped: list[str] = []
    targets = []
    for target in args.targets:
        if target.module and importlib.util.find_spec(target.module) is None:
            skipped.append(f"{target.name} (not installed)")
            print(f"{target.name}: skipped, {target.module} not installed", flush=True)
        else:
            targets.append(target)
    fake = start_fake(UPSTREAM_KEY)
    try:
        for round_no in range(1, args.rounds + 1):
            for target in targets:
                relay = start_relay(target, fake.url, plan.subject) if target.engine else None
                url = (relay or fake).url + "/v1/images/generations"
                headers = {} if relay else {"TT-API-KEY": UPSTREAM_KEY}
                try:
                    for level in args.levels:
                        if args.warmup:
                            load.run_wrk(url, BODY, headers, connections=level, duration=args.warmup)
                        r = load.run_wrk(url, BODY, headers, connections=level, duration=args.duration)
                        results.setdefault(target.name, {}).setdefault(level, []).append(r)
                        print(f"[{round_no}/{args.rounds}] {target.name:40s} {level:4d} conc  {r.rps:8.0f} req/s  "
                              f"p50 {r.p50 * 1000:7.2f} ms  p99 {r.p99 * 1000:7.2f} ms  "
                              f"errors {r.error_text()}", flush=True)
                finally:
                    if relay:
                        relay.stop()
    finally:
        fake.stop()
    return results, skipped


def median_run(runs: list[load.WrkResult]) -> load.WrkResult:
    """The run with the median req/s (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r.rps)[(len(runs) - 1) // 2]


def table(args: argparse.Namespace, results: dict[str, dict[int, list[load.WrkResult]]]) -> tuple[list[str],
                                                                                           list[list[str]]]:
    reference = {level: median_run(runs) for level, runs in results.get(REFERENCE, {}).items()}
    header = ["relay (1 uvicorn worker)"]
    for level in args.levels:
        header += [f"req/s @{level}", f"vs aiohttp @{level}", f"p50 @{level}"]
    header.append("errors")
    rows = []
    for name, by_level in results.items():
        row = [name]
        for level in args.levels:
            runs = by_level.get(level)
            if not runs:
                row += ["-", "-", "-"]
                continue
            r, ref = median_run(runs), reference.get(level)
            rps = report.fmt_num(r.rps)
            if len(runs) > 1:
                rps += f" ({report.fmt_num(min(x.rps for x in runs))}-{report.fmt_num(max(x.rps for x in runs))})"
            row += [rps, report.ratio(r.rps, ref.rps) if ref else "-", report.fmt_num(r.p50, "ms")]
        failed = [f"@{level}: {r.error_text()}" for level, runs in by_level.items() for r in runs if r.errors]
        row.append("; ".join(failed) or "0")
        rows.append(row)
    return header, rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    when = report.now_utc().strftime("%Y-%m-%d %H:%M UTC")
    raise_fd_limit()
    plan = cpu_plan(1, args.pin)
    print(f"CPUs: {plan.describe()}", flush=True)
    with OtherLoad() as others:
        results, skipped = measure(args, plan)
    other_share = others.share()
    print(f"other processes kept {100 * other_share:.0f}% of a core busy during the run", flush=True)
    header, rows = table(args, results)
    print()
    print(report.text_table(header, rows))
    if not args.no_write:
        rounds = f"median of {args.rounds} rounds (lowest-highest in brackets)" if args.rounds > 1 else "one round"
        title = f"Engine choice, {args.label}" if args.label else "Engine choice"
        body = [f"## {title} ({when})", "",
                f"- command: `{args.command}`; run took {time.monotonic() - started:.0f} s",
                *report.machine_lines(),
                f"- CPUs: {plan.describe()}",
                "- relays: bench/engines/relay.py, FastAPI unless noted, POST forwarded to the fake upstream "
                "and the whole body returned; pools raised to 10,000 connections; wrk, one thread, "
                f"{args.duration:g} s per cell after {args.warmup:g} s of warm-up; {rounds}", "",
                report.markdown_table(header, rows)]
        body += ["", f"- other processes on the machine kept {100 * other_share:.0f}% of a core busy on average "
                 "during the run"]
        if skipped:
            body += [f"- skipped: {', '.join(skipped)}"]
        if not args.label:
            body += ["", "The issue's figures, from another machine (64 concurrent unless noted): httpx 181 req/s "
                     "(86 at 512), httpx2 367, httpx-aiohttp 962, aiohttp 1,719; the upstream alone ~5,000. "
                     "The gateway uses aiohttp's ClientSession directly (gateway/upstream/client.py)."]
        key = f"engines {args.label}" if args.label else "engines"
        report.upsert_section(key, "\n".join(body), first=not args.label)
        print(f"\nwritten to {report.RESULTS}")
    return 0
