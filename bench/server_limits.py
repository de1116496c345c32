"""What the header limits cost: uvicorn's httptools protocol against the gateway's limited one (and h11).

    python -m bench.server_limits [--duration 5] [--rounds 3] [--pin]

Each variant serves the same minimal ASGI app (a 15-byte JSON answer, one process) on
uvloop; wrk POSTs to it over 64 keep-alive connections, then with ``Connection: close``
(a new connection, so a new header timer, per request). Rounds alternate the variants and
the medians go to bench/RESULTS.md. ``--pin`` puts the server on one CPU and wrk on the rest.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from typing import Any

from bench.load import run_wrk
from bench.procs import Proc, _http_ok, cpu_plan, cpu_seconds, free_port
from bench.report import fmt_num, git_revision, machine_lines, markdown_table, now_utc, upsert_section

VARIANTS = ("httptools", "limited", "h11")
MODES: dict[str, dict[str, str]] = {"keep-alive": {}, "new connection each": {"Connection": "close"}}
LIMIT = 64 * 1024


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers every request with a small JSON body after reading the request's body."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"status":"ok"}'})


def serve(variant: str, port: int) -> None:
    import uvicorn

    from gateway.http.protocol import LimitedHttpToolsProtocol

    http: Any = {"httptools": "httptools", "h11": "h11",
                 "limited": functools.partial(LimitedHttpToolsProtocol, max_header_bytes=LIMIT, header_timeout=30)}
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http=http[variant], ws="none", lifespan="off",
                access_log=False, log_level="warning", h11_max_incomplete_event_size=LIMIT)


def measure(variant: str, cpus: set[int] | None, duration: float) -> dict[str, tuple[float, float]]:
    """Per mode: requests per second, and the server's CPU microseconds per request."""
    port = free_port()
    proc = Proc(f"server-limits-{variant}", [sys.executable, "-m", "bench.server_limits", "--serve", variant,
                                             "--port", str(port)], port, cpus=cpus)
    proc.start(lambda: _http_ok(f"http://127.0.0.1:{port}/"))
    try:
        out = {}
        for mode, headers in MODES.items():
            cpu = cpu_seconds(proc.pid)
            result = run_wrk(proc.url + "/", {"prompt": "x"}, headers, connections=64, duration=duration)
            if result.errors and mode == "keep-alive":
                raise RuntimeError(f"{variant}: {result.error_text()}")
            out[mode] = (result.rps, (cpu_seconds(proc.pid) - cpu) / result.requests * 1e6)
        return out
    finally:
        proc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server_limits", description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all variants (default 3)")
    parser.add_argument("--pin", action="store_true", help="server on one CPU, wrk on the rest")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"a subset of {','.join(VARIANTS)}")
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return 0
    plan = cpu_plan(1, args.pin)
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {(v, m): [] for v in variants for m in MODES}
    for i in range(args.rounds):
        for variant in variants:
            for mode, figures in measure(variant, plan.subject, args.duration).items():
                runs[variant, mode].append(figures)
            print(f"round {i + 1}: {variant} {[runs[variant, m][-1] for m in MODES]}", flush=True)
    rows = []
    for mode in MODES:
        base_rps = statistics.median(r for r, _ in runs[variants[0], mode])
        base_cpu = statistics.median(c for _, c in runs[variants[0], mode])
        for variant in variants:
            rps = statistics.median(r for r, _ in runs[variant, mode])
            cpu = statistics.median(c for _, c in runs[variant, mode])
            rows.append([mode, variant, fmt_num(rps, "req/s"), f"{rps / base_rps:.2f}", f"{cpu:.0f} µs",
                         f"{cpu / base_cpu:.2f}"])
    when = now_utc().strftime("%Y-%m-%d %H:%M UTC")
    table = markdown_table(["connections", "protocol", "throughput", f"vs {variants[0]}", "server CPU per request",
                            f"vs {variants[0]}"], rows)
    body = "\n".join([f"## Header limits: server protocol cost ({when}, gateway {git_revision()})", "",
                      *machine_lines(), f"- {plan.describe()}; {args.rounds} rounds of {args.duration:g} s per "
                      "variant and mode, medians; wrk -t1 -c64, POST with a small JSON body", "", table, ""])
    upsert_section("server-limits", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
