"""py-spy profiles of a gateway worker under load, summarised with the gateway's own code first.

``py-spy record --format raw`` writes one line per distinct stack, ``frame;frame;... count``,
each frame ``function (path:line)``, outermost first. Only samples where the worker ran
Python are kept (no ``--idle``), so the shares are of its busy time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

RATE = 200  # samples per second
_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>.*?):(?P<line>\d+)\)$")
# Frames under which everything runs (process start, event loop): left out of the inclusive lists.
_BOOT = ("<frozen runpy>", "gateway/__main__.py", "gateway/cli.py", "gateway/server.py", "uvicorn/main.py",
         "uvicorn/server.py", "uvicorn/_compat.py", "asyncio/runners.py", "asyncio/base_events.py")


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def short_path(path: str) -> str:
    """``gateway/relay.py`` for the gateway, ``aiohttp/client.py`` for site-packages, the stdlib as is."""
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            rest = path.split(marker, 1)[1]
            return rest.split("/", 1)[1] if marker.startswith("/lib") and "/" in rest else rest
    if "/gateway/" in path:
        return "gateway/" + path.rsplit("/gateway/", 1)[1]
    return path


def _package(path: str) -> str:
    """``redis`` for ``redis/asyncio/client.py``, ``stdlib`` for the standard library and frozen modules."""
    if path.startswith(("<frozen", "<string")) or path == "?" or "/" not in path:
        return "stdlib / other" if path != "?" else "?"
    head = path.split("/", 1)[0]
    return {"_collections_abc.py": "stdlib / other"}.get(head, head)


def parse_raw(lines: Iterable[str]) -> tuple[list[tuple[list[tuple[str, str, int]], int]], int]:
    """Stacks as ([(function, short path, line), ...] outermost first, samples), and the total."""
    stacks = []
    total = 0
    for raw in lines:
        raw = raw.rstrip("\n")
        if not raw:
            continue
        text, _, count = raw.rpartition(" ")
        if not count.isdigit():
            continue
        frames = []
        for frame in text.split(";"):
            m = _FRAME.match(frame)
            if m:
                frames.append((m["func"], short_path(m["path"]), int(m["line"])))
            else:
                frames.append((frame, "?", 0))
        stacks.append((frames, int(count)))
        total += int(count)
    return stacks, total


def summarize(lines: Iterable[str], seconds: float, top: int = 15) -> str:
    stacks, total = parse_raw(lines)
    if not total:
        return "py-spy recorded no samples"
    leaf: Counter[str] = Counter()
    any_func: Counter[str] = Counter()
    own_func: Counter[str] = Counter()
    own_line: Counter[str] = Counter()
    gateway_any = 0
    package: Counter[str] = Counter()
    for frames, count in stacks:
        f, p, _ = frames[-1]
        leaf[f"{f} ({p})"] += count
        package[_package(p)] += count
        seen_any, seen_func, seen_line = set(), set(), set()
        for func, path, line in frames:
            if path in _BOOT:
                continue
            seen_any.add(f"{func} ({path})")
            if not path.startswith("gateway/"):
                continue
            seen_func.add(f"{func} ({path})")
            seen_line.add(f"{path}:{line} {func}")
        any_func.update(dict.fromkeys(seen_any, count))
        own_func.update(dict.fromkeys(seen_func, count))
        own_line.update(dict.fromkeys(seen_line, count))
        gateway_any += count if seen_func else 0

    def block(title: str, counter: Counter[str], n: int = top) -> list[str]:
        rows = [title]
        rows += [f"  {100 * k / total:5.1f}%  {name}" for name, k in counter.most_common(n)]
        return rows

    busy = total / (RATE * seconds)
    out = [f"{total} samples in {seconds:g} s at {RATE}/s: the worker ran Python {100 * busy:.0f}% of the "
           f"time; {100 * gateway_any / total:.0f}% of the samples have a gateway/ frame on their stack",
           "(a coroutine resumed by the event loop shows only its own await chain, so inclusive shares are "
           "lower bounds)"]
    out += block("self time, by package (leaf frame):", package, 12)
    out += block("self time, by function (leaf frame):", leaf)
    out += block("inclusive time, any code (event loop and process start left out):", any_func, top + 10)
    out += block("inclusive time in gateway/ functions:", own_func)
    out += block("inclusive time at gateway/ lines:", own_line)
    return "\n".join(out)


def profile_under_load(pid: int, run_load: Callable[[], Any], *, duration: float, out_dir: Path) -> str:
    """Run ``run_load`` (which must last ``duration`` + 2 s) and record ``pid`` meanwhile; the summary."""
    spy = py_spy()
    if spy is None:
        return "py-spy not found (pip install py-spy)"
    out_dir.mkdir(exist_ok=True)
    raw = out_dir / f"profile-{pid}.txt"
    load = threading.Thread(target=run_load, daemon=True)
    load.start()
    time.sleep(1.0)  # the load reaches its steady state
    proc = subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(int(duration)), "--rate",
                           str(RATE), "--format", "raw", "--nonblocking", "--output", str(raw)],
                          capture_output=True, text=True, timeout=duration + 60)
    load.join()
    if proc.returncode != 0 or not raw.exists():
        return f"py-spy failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}"
    summary = summarize(raw.read_text().splitlines(), int(duration))
    return summary + f"\n(raw stacks: bench/out/{raw.name}, not kept in git; flamegraph.pl or speedscope draw them)"
