"""Tables, the machine's description, and sections of bench/RESULTS.md."""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
NPROC = len(os.sched_getaffinity(0))  # read at import, before the bench pins itself to fewer CPUs
PACKAGES = ("uvicorn", "uvloop", "httptools", "starlette", "fastapi", "aiohttp", "redis", "prometheus-client",
            "orjson", "httpx", "httpx2", "httpx-aiohttp")


def now_utc() -> datetime:
    return datetime.now(UTC)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_versions(names: Iterable[str] = PACKAGES) -> str:
    out = []
    for name in names:
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(out)


def _tool_version(cmd: Sequence[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def git_revision() -> str:
    """HEAD's short hash, with ``+dirty`` when gateway/ has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        def git(*args: str) -> str:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)
            return done.stdout.strip()

        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "gateway")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def machine_lines() -> list[str]:
    redis_version = _tool_version(["redis-server", "--version"])
    wrk_version = _tool_version(["wrk", "-v"])
    return [
        f"- machine: {os.cpu_count()} CPUs (`nproc` {NPROC}), {cpu_model()}, "
        f"{platform.system()} {platform.release()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()})",
        f"- packages: {package_versions()}",
        f"- tools: {redis_version.split(' sha=')[0]}; {wrk_version.split(' Copyright')[0]}",
    ]


# --- numbers ---------------------------------------------------------------------------------------


def fmt_num(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "ms":
        return f"{value * 1000:.2f} ms" if value < 0.1 else f"{value * 1000:.0f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "MiB":
        return f"{value / 2**20:.0f} MiB"
    if unit == "req/s":
        return f"{value:,.0f} req/s" if value >= 100 else f"{value:.1f} req/s"
    return f"{value:,.0f}{unit}" if abs(value) >= 100 else f"{value:.3g}{unit}"


def ratio(through: float | None, direct: float | None) -> str:
    if not through or not direct or math.isnan(through) or math.isnan(direct):
        return "-"
    return f"{through / direct:.2f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(r) for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max([len(str(h)), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                           strict=True)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# --- RESULTS.md ---------------------------------------------------------------------------------------

_INTRO = """# Benchmark results

Written by `python -m bench.run` (`make bench`) and `python -m bench.engines`; each run
rewrites its own section (same date, revision, options and label) and leaves the others.
Every figure is measured in the same run as its baseline (the fake upstream served
directly), and the ratios through/direct are what to compare between runs and machines.

Caveat: the load generator (wrk, one thread; aiohttp in the bench process for streams
and slow requests), the gateway, the fake upstream and redis-server share this machine's
cores. `bench.run` leaves placement to the scheduler by default, as users run it (`--pin`
puts the gateway on its own CPU(s) and everything else on the rest); `bench.engines` pins
by default (`--no-pin`). Unpinned, figures on a 2-core machine swing by 30% from run to run. The direct baseline
shares its core with wrk, so it understates what the fake serves on a core of its own.
"""


def _section_re(key: str) -> re.Pattern[str]:
    return re.compile(rf"<!-- section: {re.escape(key)} -->\n.*?<!-- /section -->\n", re.S)


def upsert_section(key: str, body: str, *, path: Path = RESULTS, first: bool = False) -> None:
    """Replace the section ``key`` of RESULTS.md, or add it (at the top with ``first``, else at the end)."""
    text = path.read_text() if path.exists() else _INTRO
    block = f"<!-- section: {key} -->\n{body.rstrip()}\n<!-- /section -->\n"
    pattern = _section_re(key)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    elif first:
        at = text.find("<!-- section: ")
        text = text.rstrip() + "\n\n" + block if at < 0 else text[:at] + block + "\n" + text[at:]
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)
