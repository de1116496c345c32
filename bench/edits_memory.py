"""Memory of one large edit: a 50 MiB image through the gateway should cost at most about one copy.

    python -m bench.edits_memory [--mib 50] [--runs 3]

Starts redis-server, the fake upstream and one gateway worker; warms the worker up with a small
edit, then for each run resets the worker's peak RSS (``/proc/PID/clear_refs``, 5), sends one
edit whose image is ``--mib`` MiB (streamed from a file by httpx, so the bench's own memory does
not matter), and reads the peak (``VmHWM``) against the RSS just before. The fake checks the
digest of what arrived. Writes its section of bench/RESULTS.md (date and commit).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import subprocess
import tempfile
from pathlib import Path

import httpx
import yaml

from bench.procs import start_fake, start_gateway, start_redis
from bench.report import upsert_section
from gateway.devtools import fake_images

KEY = "sk-igw-bench-edits-0123456789"
UPSTREAM_KEY = "tt-bench-edits"
MIB = 1024 * 1024


def _status(pid: int, field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _edit(url: str, image: Path) -> httpx.Response:
    with image.open("rb") as f:
        return httpx.post(url + "/v1/images/edits", headers={"authorization": f"Bearer {KEY}"}, timeout=300,
                          data={"prompt": "bench", "model": "gpt-image-1", "quality": "low"},
                          files={"image": ("big.png", f, "image/png")})


def measure(mib: int, runs: int) -> list[tuple[int, int]]:
    """(RSS before, peak during) of the gateway worker for each run, in bytes."""
    work = Path(tempfile.mkdtemp(prefix="bench-edits-"))
    image = work / "big.png"
    image.write_bytes(fake_images.encode("png", b"bench-ed", mib * MIB))
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    small = work / "small.png"
    small.write_bytes(fake_images.encode("png", b"bench-sm"))
    config = work / "gateway.yaml"
    config.write_text(yaml.safe_dump({"keys": [{"user": "bench", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
                                      "usage": {"spool_path": str(work / "usage.spool")}}))
    redis = start_redis(work)
    fake = start_fake(UPSTREAM_KEY)
    gateway = None
    try:
        env = {"TTAPI_API_KEY": UPSTREAM_KEY, "UPSTREAM_BASE_URL": fake.url,
               "REDIS_URL": f"redis://127.0.0.1:{redis.port}/0"}
        gateway = start_gateway(config, env, workers=1)
        _edit(gateway.url, small).raise_for_status()  # imports, pools and caches warmed up
        results = []
        for _ in range(runs):
            Path(f"/proc/{gateway.pid}/clear_refs").write_text("5")  # peak RSS := current RSS
            before = _status(gateway.pid, "VmRSS")
            _edit(gateway.url, image).raise_for_status()
            results.append((before, _status(gateway.pid, "VmHWM")))
            seen = httpx.get(fake.url + "/_fake/stats").json()["recent"][-1]["files"][0]
            assert seen["sha256"] == digest and seen["size"] == image.stat().st_size, seen
        return results
    finally:
        for proc in (gateway, fake, redis):
            if proc is not None:
                proc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results = measure(args.mib, args.runs)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    copy = args.mib * MIB
    rows = "\n".join(f"| {i + 1} | {b / MIB:.1f} | {p / MIB:.1f} | {(p - b) / MIB:.1f} | {(p - b) / copy:.2f} |"
                     for i, (b, p) in enumerate(results))
    worst = max(p - b for b, p in results)
    body = f"""## Edit memory ({day}, gateway {rev}): one {args.mib} MiB image through `POST /v1/images/edits`

`python -m bench.edits_memory --mib {args.mib} --runs {args.runs}`: one gateway worker, the peak RSS
(VmHWM, reset before each run) against the RSS just before; the fake upstream checked the digest.
Target: at most about one copy of the upload ({args.mib} MiB). Worst run: {worst / MIB:.1f} MiB
({worst / (args.mib * MIB):.2f} copies): files are spooled to an unnamed temporary file past 1 MiB and
streamed upstream from it in 64 KiB reads.

| run | RSS before (MiB) | peak (MiB) | increase (MiB) | copies |
|---|---|---|---|---|
{rows}
"""
    upsert_section(f"edits-memory {day} {rev} mib={args.mib}", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
