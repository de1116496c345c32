"""The fake TTAPI as its users see it: auth, real images, table usage, SSE, knobs and stats.

Most tests drive a real ``gateway fake-upstream`` process with the official SDK (sending
``TT-API-KEY`` the way the gateway does); a few serve the app in-process.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from gateway.cli.main import build_parser
from gateway.devtools.fake_answers import FakeOptions
from gateway.devtools.fake_upstream import options_from_args, serve_in_process
from gateway.metering import estimates
from tests.support.procs import Service, start_fake_upstream, wait_until

KEY = "tt-test-key"
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
TIMEOUT = httpx.Timeout(30)
USAGE_KEYS = ("input_text_tokens", "input_image_tokens", "output_tokens", "total_tokens", "images")


def sdk(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="sk-client-key", default_headers={"TT-API-KEY": key},
                         max_retries=0, timeout=30)


def post(url: str, body: dict[str, Any], key: str | None = KEY,
         timeout: httpx.Timeout = TIMEOUT) -> httpx.Response:
    headers = {"TT-API-KEY": key} if key is not None else {}
    return httpx.post(url + "/v1/images/generations", json=body, headers=headers, timeout=timeout)


def stats(url: str) -> dict[str, Any]:
    return httpx.get(url + "/_fake/stats").json()  # type: ignore[no-any-return]


def decode(data: bytes, fmt: str = "png") -> Image.Image:
    """The image, after Pillow checked its structure (CRCs, chunks) and decoded its pixels."""
    with Image.open(io.BytesIO(data)) as checked:
        checked.verify()
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == PIL_FORMATS[fmt]
    return image


def usage_of(size: str, quality: str, n: int, prompt: str) -> dict[str, Any]:
    text = estimates.text_tokens(prompt)
    output = estimates.output_tokens_per_image(size, quality) * n
    return {"input_tokens": text, "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
            "output_tokens": output, "total_tokens": text + output}


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each complete SSE event in ``raw``."""
    events = []
    for block in raw.decode().split("\n\n"):
        lines = block.split("\n")
        if len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "):
            events.append((lines[0][len("event: "):], json.loads(lines[1][len("data: "):])))
    return events


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


# --- auth -----------------------------------------------------------------------------------------

def test_missing_or_wrong_key_is_401_invalid_api_key(upstream: Service) -> None:
    for key in (None, "", "tt-wrong"):
        response = post(upstream.url, {"model": "gpt-image-1", "prompt": "a cat"}, key=key)
        assert response.status_code == 401
        assert error_of(response)["code"] == "invalid_api_key"
    with sdk(upstream.url, "tt-wrong") as c, pytest.raises(openai.AuthenticationError):
        c.images.generate(model="gpt-image-1", prompt="a cat")


def test_every_key_given_repeated_or_comma_separated_is_accepted(upstream: Service) -> None:
    for key in (KEY, "tt-second", "tt-third"):
        assert post(upstream.url, {"model": "gpt-image-1", "prompt": "a cat"}, key=key).status_code == 200


def test_refused_key_is_403(upstream: Service) -> None:
    with sdk(upstream.url, "tt-refused") as c, pytest.raises(openai.PermissionDeniedError) as caught:
        c.images.generate(model="gpt-image-1", prompt="a cat")
    error_of(httpx.Response(403, content=caught.value.response.content))


# --- images and usage -----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_gpt_image_returns_decodable_image_in_the_asked_format(client: openai.OpenAI, fmt: str) -> None:
    result = client.images.generate(model="gpt-image-1", prompt="a red fox", output_format=fmt)  # type: ignore[call-overload]
    assert result.data is not None and len(result.data) == 1
    assert result.data[0].b64_json is not None and result.data[0].url is None
    decode(base64.b64decode(result.data[0].b64_json), fmt)
    assert (result.output_format, result.size, result.quality, result.background) == (
        fmt, "1024x1024", "medium", "opaque")
    assert result.created > 0


@pytest.mark.parametrize(("model", "size", "quality", "n", "output_tokens"), [
    ("gpt-image-1", "1024x1024", "high", 2, 8320),
    ("gpt-image-1", "1536x1024", "low", 1, 400),
    ("gpt-image-1.5", "1024x1536", "medium", 3, 3 * 1584),
    ("gpt-image-1", "auto", "auto", 1, 1056),  # auto: 1024x1024, medium
    ("gpt-image-2", "2048x1152", "high", 1, 9360),  # free size: the square figure scaled by area
])
def test_usage_follows_the_size_quality_table(client: openai.OpenAI, model: str, size: str, quality: str,
                                               n: int, output_tokens: int) -> None:
    prompt = "a lighthouse at dusk, oil painting"
    result = client.images.generate(model=model, prompt=prompt, size=size, quality=quality, n=n)  # type: ignore[call-overload]
    assert result.usage is not None
    usage = result.usage.model_dump(exclude_unset=True)  # exactly the fields the fake sent
    shown_size = "1024x1024" if size == "auto" else size
    shown_quality = "medium" if quality == "auto" else quality
    assert usage == usage_of(shown_size, shown_quality, n, prompt)
    assert usage["output_tokens"] == output_tokens
    assert len(result.data or []) == n
    assert (result.size, result.quality) == (shown_size, shown_quality)


def test_images_are_deterministic_per_prompt_and_index(client: openai.OpenAI) -> None:
    def images(prompt: str) -> list[str]:
        result = client.images.generate(model="gpt-image-1", prompt=prompt, n=2)
        return [d.b64_json or "" for d in result.data or []]

    first, again, other = images("a cat"), images("a cat"), images("a dog")
    assert first == again
    assert first[0] != first[1]
    assert set(first).isdisjoint(other)


def test_dall_e_urls_download_from_the_fake(client: openai.OpenAI, upstream: Service) -> None:
    result = client.images.generate(model="dall-e-2", prompt="a boat", n=2, size="512x512")
    assert result.usage is None and result.output_format is None
    for item in result.data or []:
        assert item.url is not None and item.b64_json is None and item.revised_prompt is None
        download = httpx.get(item.url)
        assert download.status_code == 200 and download.headers["content-type"] == "image/png"
        decode(download.content)
    assert stats(upstream.url)["files_served"] == 2


def test_dall_e_3_revises_the_prompt_and_can_answer_b64(client: openai.OpenAI) -> None:
    result = client.images.generate(model="dall-e-3", prompt="a boat", response_format="b64_json")
    item = (result.data or [])[0]
    assert item.revised_prompt and "a boat" in item.revised_prompt
    assert item.b64_json is not None
    decode(base64.b64decode(item.b64_json))
    assert result.usage is None


# --- streaming ------------------------------------------------------------------------------------

def test_stream_sends_partials_then_completed_per_image_and_usage_sums(client: openai.OpenAI) -> None:
    prompt = "a mountain lake"
    stream = client.images.generate(model="gpt-image-1", prompt=prompt, n=2, partial_images=2, quality="high",
                                    output_format="webp", stream=True)
    events = list(stream)
    partial, completed_type = "image_generation.partial_image", "image_generation.completed"
    assert [e.type for e in events] == [partial, partial, completed_type, partial, partial, completed_type]
    assert [getattr(e, "partial_image_index", None) for e in events] == [0, 1, None, 0, 1, None]
    for event in events:
        decode(base64.b64decode(event.b64_json), "webp")
        assert (event.size, event.quality, event.background, event.output_format) == (
            "1024x1024", "high", "opaque", "webp")
    completed = [e for e in events if e.type == "image_generation.completed"]
    totals = {k: sum(e.usage.model_dump()[k] for e in completed)  # type: ignore[union-attr]
              for k in ("input_tokens", "output_tokens", "total_tokens")}
    whole = usage_of("1024x1024", "high", 2, prompt)
    assert totals == {k: whole[k] for k in totals}
    assert completed[1].usage.input_tokens == 0  # type: ignore[union-attr]


def test_stream_wire_format_is_event_line_then_data_line(upstream: Service) -> None:
    body = {"model": "gpt-image-1", "prompt": "a cat", "stream": True, "partial_images": 1}
    response = post(upstream.url, body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.content.startswith(b"event: image_generation.partial_image\ndata: {")
    assert response.content.endswith(b"\n\n")
    names = [name for name, _ in sse_events(response.content)]
    assert names == ["image_generation.partial_image", "image_generation.completed"]
    assert [data["type"] for _, data in sse_events(response.content)] == names


def test_each_event_reaches_the_client_before_the_next_is_written(upstream: Service) -> None:
    """With an hour between events, the first one still arrives: the fake does not batch."""
    body = {"model": "gpt-image-1", "prompt": "a cat", "stream": True, "partial_images": 1,
            "fake": {"event_gap": 3600}}
    received = b""
    with httpx.stream("POST", upstream.url + "/v1/images/generations", json=body, headers={"TT-API-KEY": KEY},
                      timeout=httpx.Timeout(30)) as response:
        for chunk in response.iter_raw():
            received += chunk
            if b"\n\n" in received:
                break
    assert [name for name, _ in sse_events(received)] == ["image_generation.partial_image"]
    wait_until(lambda: stats(upstream.url)["aborted"] == 1, "the fake to see the client leave")


def test_stream_for_dall_e_is_refused(upstream: Service) -> None:
    response = post(upstream.url, {"model": "dall-e-3", "prompt": "a cat", "stream": True})
    assert response.status_code == 400 and error_of(response)["param"] == "stream"


# --- knobs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "code"), [(400, "invalid_value"), (429, "rate_limit_exceeded"),
                                              (500, "server_error"), (503, "service_unavailable")])
@pytest.mark.parametrize("stream", [False, True])
def test_status_knob_answers_an_openai_error(upstream: Service, status: int, code: str, stream: bool) -> None:
    body = {"model": "gpt-image-1", "prompt": "a cat", "stream": stream, "fake": {"status": status}}
    response = post(upstream.url, body)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert error_of(response)["code"] == code
    assert stats(upstream.url)["usage"]["images"] == 0


def test_status_knob_through_the_sdk_extra_body(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        client.images.generate(model="gpt-image-1", prompt="a cat", extra_body={"fake": {"status": 429}})


def test_cut_stream_drops_the_connection_and_counts_only_completed_events(upstream: Service) -> None:
    prompt = "a cat"
    body = {"model": "gpt-image-1", "prompt": prompt, "stream": True, "n": 2, "partial_images": 1,
            "quality": "low", "fake": {"cut_after": 3}}
    received = b""
    with pytest.raises(httpx.RemoteProtocolError), \
            httpx.stream("POST", upstream.url + "/v1/images/generations", json=body,
                         headers={"TT-API-KEY": KEY}, timeout=30) as response:
        for chunk in response.iter_raw():
            received += chunk
    names = [name for name, _ in sse_events(received)]
    assert names == ["image_generation.partial_image", "image_generation.completed",
                     "image_generation.partial_image"]
    served = stats(upstream.url)
    assert served["cut"] == 1
    first = usage_of("1024x1024", "low", 1, prompt)
    assert served["usage"] == {"input_text_tokens": first["input_tokens"], "input_image_tokens": 0,
                               "output_tokens": first["output_tokens"], "total_tokens": first["total_tokens"],
                               "images": 1}


def test_cut_body_sends_headers_and_part_of_the_json(upstream: Service) -> None:
    body = {"model": "gpt-image-1", "prompt": "a cat", "fake": {"cut_after": 20}}
    with httpx.stream("POST", upstream.url + "/v1/images/generations", json=body,
                      headers={"TT-API-KEY": KEY}, timeout=30) as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            response.read()
    served = stats(upstream.url)
    assert served["cut"] == 1 and served["usage"]["images"] == 0


@pytest.mark.parametrize(("fmt", "pad"), [("png", 3_000_000), ("jpeg", 300_000), ("webp", 300_000)])
def test_pad_bytes_makes_big_images_that_still_decode(client: openai.OpenAI, fmt: str, pad: int) -> None:
    result = client.images.generate(model="gpt-image-1", prompt="a cat", output_format=fmt,  # type: ignore[call-overload]
                                    extra_body={"fake": {"pad_bytes": pad}})
    data = base64.b64decode((result.data or [])[0].b64_json or "")
    assert pad <= len(data) <= pad * 1.01
    assert decode(data, fmt).size == (16, 16)


def test_padded_stream_events_decode(client: openai.OpenAI) -> None:
    events = list(client.images.generate(model="gpt-image-1", prompt="a cat", stream=True, partial_images=1,
                                         extra_body={"fake": {"pad_bytes": 1_000_000}}))
    assert len(events) == 2
    for event in events:
        assert len(base64.b64decode(event.b64_json)) >= 1_000_000
        decode(base64.b64decode(event.b64_json))


def test_hang_holds_the_connection_until_the_client_gives_up(upstream: Service) -> None:
    with pytest.raises(httpx.ReadTimeout):
        post(upstream.url, {"model": "gpt-image-1", "prompt": "a cat", "fake": {"hang": True}},
             timeout=httpx.Timeout(30, read=0.5))
    wait_until(lambda: stats(upstream.url)["aborted"] == 1, "the fake to see the client leave")
    assert stats(upstream.url)["by_status"] == {}


def test_latency_delays_but_still_answers(client: openai.OpenAI) -> None:
    result = client.images.generate(model="gpt-image-1", prompt="a cat",
                                    extra_body={"fake": {"latency": 0.2}})
    assert result.usage is not None


def test_created_knob_makes_answers_byte_identical(upstream: Service) -> None:
    body = {"model": "gpt-image-1", "prompt": "same", "stream": True, "partial_images": 2, "n": 2,
            "fake": {"created": 1700000000}}
    first, second = post(upstream.url, body), post(upstream.url, body)
    assert first.content == second.content
    assert [data["created_at"] for _, data in sse_events(first.content)] == [1700000000] * 6
    assert post(upstream.url, {**body, "stream": False}).json()["created"] == 1700000000


def test_recent_keeps_the_exact_request_bytes(upstream: Service) -> None:
    raw = b'{"model":"gpt-image-1",  "prompt":"keep my bytes", "zz": {"b": 2, "a": 1}}'
    response = httpx.post(upstream.url + "/v1/images/generations", content=raw,
                          headers={"TT-API-KEY": KEY, "Content-Type": "application/json"})
    assert response.status_code == 200
    seen = stats(upstream.url)["recent"][-1]
    assert seen["raw"] == raw.decode() and seen["body"]["zz"] == {"b": 2, "a": 1}
    assert seen["headers"]["content-type"] == "application/json"


def test_usage_false_omits_usage(client: openai.OpenAI, upstream: Service) -> None:
    result = client.images.generate(model="gpt-image-1", prompt="a cat",
                                    extra_body={"fake": {"usage": False}})
    assert result.usage is None and len(result.data or []) == 1
    events = list(client.images.generate(model="gpt-image-1", prompt="a cat", stream=True,
                                         extra_body={"fake": {"usage": False}}))
    assert [e.type for e in events] == ["image_generation.completed"]
    assert "usage" not in events[0].model_dump(exclude_unset=True)
    served = stats(upstream.url)
    assert served["usage"] == {"input_text_tokens": 0, "input_image_tokens": 0, "output_tokens": 0,
                               "total_tokens": 0, "images": 2}


@pytest.mark.parametrize("knobs", [{"latncy": 1}, {"status": 200}, {"hang": 1}, {"pad_bytes": -1}, [1]])
def test_bad_knob_is_400(upstream: Service, knobs: Any) -> None:
    response = post(upstream.url, {"model": "gpt-image-1", "prompt": "a cat", "fake": knobs})
    assert response.status_code == 400
    assert error_of(response)["param"].startswith("fake")


# --- stats, routes, process -----------------------------------------------------------------------

def test_stats_reconcile_with_what_was_returned(client: openai.OpenAI, upstream: Service) -> None:
    first = client.images.generate(model="gpt-image-1", prompt="one", n=2, quality="high")
    streamed = [e for e in client.images.generate(model="gpt-image-1.5", prompt="two", n=2, stream=True,
                                                  partial_images=1) if e.type == "image_generation.completed"]
    client.images.generate(model="dall-e-3", prompt="three")
    post(upstream.url, {"model": "gpt-image-1", "prompt": "four"}, key=None)
    with pytest.raises(openai.RateLimitError):
        client.images.generate(model="gpt-image-1", prompt="five", extra_body={"fake": {"status": 429}})

    def totals(usages: list[Any], images: int) -> dict[str, int]:
        return {"input_text_tokens": sum(u.input_tokens_details.text_tokens for u in usages),
                "input_image_tokens": sum(u.input_tokens_details.image_tokens for u in usages),
                "output_tokens": sum(u.output_tokens for u in usages),
                "total_tokens": sum(u.total_tokens for u in usages), "images": images}

    served = stats(upstream.url)
    assert served["requests"] == 5
    assert served["by_status"] == {"200": 3, "401": 1, "429": 1}
    gpt1, gpt15 = totals([first.usage], 2), totals([e.usage for e in streamed], 2)
    assert served["by_model"]["gpt-image-1"] == {"requests": 2, **gpt1}
    assert served["by_model"]["gpt-image-1.5"] == {"requests": 1, **gpt15}
    assert served["by_model"]["dall-e-3"] == {"requests": 1, **totals([], 1)}
    assert served["usage"] == {k: gpt1[k] + gpt15[k] + (k == "images") for k in USAGE_KEYS}

    recent = served["recent"]
    assert [r["model"] for r in recent] == ["gpt-image-1", "gpt-image-1.5", "dall-e-3", "gpt-image-1",
                                            "gpt-image-1"]
    assert [r["status"] for r in recent] == [200, 200, 200, 401, 429]
    assert all(name == name.lower() for r in recent for name in r["headers"])
    assert recent[0]["headers"]["tt-api-key"] == KEY and "tt-api-key" not in recent[3]["headers"]
    assert recent[4]["body"]["fake"] == {"status": 429}

    httpx.post(upstream.url + "/_fake/reset").raise_for_status()
    zeroed = stats(upstream.url)
    assert zeroed["requests"] == 0 and zeroed["recent"] == [] and zeroed["usage"]["total_tokens"] == 0


def test_unknown_routes_are_openai_404s(upstream: Service) -> None:
    routes = (("GET", "/v1/nope"), ("GET", "/v1/images/generations"), ("POST", "/v1/images/variations"))
    for method, path in routes:
        response = httpx.request(method, upstream.url + path)
        assert response.status_code == 404
        error = error_of(response)
        assert error["message"] == f"Invalid URL ({method} {path})" and error["code"] is None


def test_bad_requests_are_400(upstream: Service) -> None:
    bad = httpx.post(upstream.url + "/v1/images/generations", content=b"{not json",
                     headers={"TT-API-KEY": KEY})
    assert bad.status_code == 400
    assert (stats(upstream.url)["recent"][-1]["raw"], stats(upstream.url)["recent"][-1]["body"]) == (
        "{not json", None)
    assert error_of(post(upstream.url, {"model": "gpt-image-1"}))["code"] == "missing_required_parameter"
    assert error_of(post(upstream.url, {"model": "flux", "prompt": "x"}))["param"] == "model"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_process_exits_cleanly_on_signal_even_with_a_hung_request(sig: int) -> None:
    service = start_fake_upstream(KEY)
    assert service.proc is not None
    proc = service.proc

    def hang() -> None:
        try:
            post(service.url, {"model": "gpt-image-1", "prompt": "x", "fake": {"hang": True}})
        except httpx.HTTPError:
            pass  # the fake went away: what this test wants

    caller = threading.Thread(target=hang)
    caller.start()
    try:
        wait_until(lambda: stats(service.url)["requests"] == 1, "the hung request to arrive")
        proc.send_signal(sig)
        assert proc.wait(30) == 0
    finally:
        service.stop()
        caller.join(30)


def test_cli_flags_become_options() -> None:
    args = build_parser().parse_args(["fake-upstream", "--key", "a, b", "--key", "c", "--refuse-key", "x",
                                      "--latency", "0.5", "--event-gap", "0.25", "--pad-bytes", "1000"])
    assert options_from_args(args) == FakeOptions(keys=frozenset({"a", "b", "c"}),
                                                  refuse_keys=frozenset({"x"}), latency=0.5, event_gap=0.25,
                                                  pad_bytes=1000)
    assert (args.host, args.port) == ("127.0.0.1", 9090)


# --- in-process -----------------------------------------------------------------------------------

async def test_in_process_defaults_apply_and_requests_override_them() -> None:
    async with serve_in_process(FakeOptions(pad_bytes=50_000, event_gap=0.01)) as url, \
            httpx.AsyncClient(base_url=url, timeout=30) as http:
        body = {"model": "gpt-image-1", "prompt": "a cat"}
        padded = await http.post("/v1/images/generations", json=body, headers={"TT-API-KEY": "anything"})
        assert padded.status_code == 200  # no --key: any non-empty key
        assert len(base64.b64decode(padded.json()["data"][0]["b64_json"])) >= 50_000
        small = await http.post("/v1/images/generations", json={**body, "fake": {"pad_bytes": 0}},
                                headers={"TT-API-KEY": "anything"})
        assert len(base64.b64decode(small.json()["data"][0]["b64_json"])) < 1000
        streamed = await http.post("/v1/images/generations",
                                   json={**body, "stream": True, "partial_images": 3},
                                   headers={"TT-API-KEY": "anything"})
        assert len(sse_events(streamed.content)) == 4
        assert (await http.post("/v1/images/generations", json=body)).status_code == 401
        assert (await http.get("/healthz")).status_code == 200


def test_stats_report_the_most_requests_in_flight_at_once(upstream: Service) -> None:
    start = threading.Barrier(3)

    def one(_: int) -> int:
        start.wait()
        return post(upstream.url, {"prompt": "x", "fake": {"latency": 0.5}}).status_code

    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(one, range(3))) == [200, 200, 200]
    stats = httpx.get(upstream.url + "/_fake/stats").json()
    assert stats["in_flight"] == 0
    assert 2 <= stats["max_in_flight"] <= 3  # 3 sent together, each held 0.5 s
