"""``POST /v1/images/edits`` end to end: the official SDK → gateway process → fake TTAPI process.

What the upstream received (each file's digest, name and type, the fields) is read back from the
fake's ``/_fake/stats``; billing from the admin API, the record export and ``/metrics``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from gateway.devtools.fake_answers import INPUT_IMAGE_TOKENS
from tests.support.procs import (
    RedisServer,
    Service,
    module_fake_upstream,
    start_gateway,
    wait_until,
)

KEY = "sk-igw-test_edits-0123456789abcdef"
LIMITED_KEY = "sk-igw-test_edits-limited-key-xyz"
UPSTREAM_KEY = "tt-edits-key"
ADMIN_TOKEN = "admin-token-test-edits-77ab"
EDIT_LIMIT = 300_000  # max_edit_body_bytes of the module's gateway
AUTH = {"authorization": f"Bearer {KEY}"}


def picture(fmt: str = "PNG", size: tuple[int, int] = (64, 64), colour: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, fmt)
    return out.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


fake = module_fake_upstream(UPSTREAM_KEY)


@pytest.fixture(scope="module")
def gateway(fake: Service, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    config = {
        "default_model": "gpt-image-1", "max_edit_body_bytes": EDIT_LIMIT,
        "models": {"gpt-image-1": {"input_text_per_1m": 5.0, "input_image_per_1m": 10.0, "output_per_1m": 40.0},
                   "dall-e-2": {"per_image": {"standard-1024x1024": 0.02}}, "dall-e-3": {}},
        "plans": {"default": {}, "small": {"images_per_minute": 3}},
        "keys": [{"user": "edith", "team": "art", "sha256": sha(KEY.encode())},
                 {"user": "lim", "plan": "small", "sha256": sha(LIMITED_KEY.encode())}],
    }
    env = {"TTAPI_API_KEY": UPSTREAM_KEY, "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_server.url,
           "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
    svc = start_gateway(config, env, tmp=tmp_path_factory.mktemp("gw"))
    yield svc
    svc.stop()


@pytest.fixture
def stats(fake: Service) -> Any:
    httpx.post(fake.url + "/_fake/reset")
    return lambda: httpx.get(fake.url + "/_fake/stats").json()


def sdk(gateway: Service, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=60)


def post_edit(gateway: Service, data: Any, files: Any, key: str = KEY) -> httpx.Response:
    """A multipart edit; ``data`` may be a list of pairs (to send a field twice)."""
    pairs = data.items() if isinstance(data, dict) else data
    parts = [(name, (None, value)) for name, value in pairs]
    parts += files.items() if isinstance(files, dict) else files
    return httpx.post(gateway.url + "/v1/images/edits", files=parts, headers={"authorization": f"Bearer {key}"},
                      timeout=60)


def test_two_images_and_a_mask_reach_the_upstream_byte_for_byte(gateway: Service, stats: Any) -> None:
    first, second, mask = picture("PNG"), picture("JPEG", colour="blue"), picture("PNG", colour="black")
    result = sdk(gateway).images.edit(
        image=[("first.png", first, "image/png"), ("second photo.jpg", second, "image/jpeg")],
        mask=("mask.png", mask, "image/png"), prompt="add a hat", model="gpt-image-1", n=2, size="1024x1024",
        quality="low", input_fidelity="high", extra_headers={"cookie": "session=secret"})
    assert result.data is not None and len(result.data) == 2
    for item in result.data:
        Image.open(io.BytesIO(base64.b64decode(item.b64_json or ""))).load()
    assert result.usage is not None
    assert result.usage.input_tokens_details.image_tokens == 2 * INPUT_IMAGE_TOKENS
    [seen] = stats()["recent"]
    assert seen["path"] == "/v1/images/edits" and seen["status"] == 200
    assert seen["files"] == [
        {"field": "image[]", "filename": "first.png", "content_type": "image/png", "size": len(first),
         "sha256": sha(first)},
        {"field": "image[]", "filename": "second photo.jpg", "content_type": "image/jpeg", "size": len(second),
         "sha256": sha(second)},
        {"field": "mask", "filename": "mask.png", "content_type": "image/png", "size": len(mask), "sha256": sha(mask)},
    ]
    fields = dict(seen["fields"])
    assert fields == {"prompt": "add a hat", "model": "gpt-image-1", "n": "2", "size": "1024x1024", "quality": "low",
                      "input_fidelity": "high"}
    headers = seen["headers"]
    assert headers["tt-api-key"] == UPSTREAM_KEY
    assert "authorization" not in headers and "cookie" not in headers
    assert headers["content-type"].startswith("multipart/form-data; boundary=")


def test_single_image_field_and_default_model_are_forwarded(gateway: Service, stats: Any) -> None:
    image = picture("WEBP")
    r = post_edit(gateway, {"prompt": "p", "size": "1024x1024"}, {"image": ("in.webp", image, "image/webp")})
    assert r.status_code == 200, r.text
    [seen] = stats()["recent"]
    assert [(f["field"], f["sha256"]) for f in seen["files"]] == [("image", sha(image))]
    assert dict(seen["fields"])["model"] == "gpt-image-1"  # the gateway's default_model, not dall-e-2's


def test_streamed_edit_relays_the_upstreams_bytes(gateway: Service, fake: Service) -> None:
    events = sdk(gateway).images.edit(image=("a.png", picture(), "image/png"), prompt="stream me",
                                      model="gpt-image-1", stream=True, partial_images=2)
    kinds = [event.type for event in events]
    assert kinds == ["image_edit.partial_image", "image_edit.partial_image", "image_edit.completed"]
    data = {"prompt": "same bytes", "model": "gpt-image-1", "stream": "true", "partial_images": "1",
            "fake": '{"created": 1700000000}'}
    files = [("image[]", ("a.png", picture(), "image/png"))]
    through = post_edit(gateway, data, files)
    direct = httpx.post(fake.url + "/v1/images/edits", data=data, files=files,
                        headers={"tt-api-key": UPSTREAM_KEY}, timeout=60)
    assert through.headers["content-type"] == "text/event-stream"
    assert through.content == direct.content
    assert b"event: image_edit.completed" in through.content


def _image(name: str = "a.png", data: bytes | None = None, field: str = "image") -> tuple[str, Any]:
    return (field, (name, picture() if data is None else data, "image/png"))


BAD_EDITS: list[tuple[str, Any, list[tuple[str, Any]], str]] = [
    ("no image", {"prompt": "p"}, [], "image"),
    ("17 images", {"prompt": "p"}, [_image(field="image[]")] * 17, "image"),
    ("text file named .png", {"prompt": "p"}, [_image("notes.png", b"just some text, not a picture")], "image"),
    ("empty image", {"prompt": "p"}, [_image("empty.png", b"")], "image"),
    ("mask on dall-e-3", {"prompt": "p", "model": "dall-e-3"}, [_image(), _image("m.png", field="mask")], "model"),
    ("n=11", {"prompt": "p", "n": "11"}, [_image()], "n"),
    ("n not a number", {"prompt": "p", "n": "two"}, [_image()], "n"),
    ("duplicate model", [("prompt", "p"), ("model", "gpt-image-1"), ("model", "dall-e-2")], [_image()], "model"),
    ("duplicate prompt in another case", [("prompt", "p"), ("Prompt", "q")], [_image()], "Prompt"),
    ("missing prompt", {"model": "gpt-image-1"}, [_image()], "prompt"),
    ("non-square png on dall-e-2", {"prompt": "p", "model": "dall-e-2"},
     [_image(data=picture(size=(64, 32)))], "image"),
    ("jpeg on dall-e-2", {"prompt": "p", "model": "dall-e-2"}, [_image("a.jpg", picture("JPEG"))], "image"),
    ("two images on dall-e-2", {"prompt": "p", "model": "dall-e-2"}, [_image(), _image()], "image"),
    ("mask size mismatch", {"prompt": "p"}, [_image(), _image("m.png", picture(size=(32, 32)), "mask")], "mask"),
    ("jpeg mask", {"prompt": "p"}, [_image(), _image("m.jpg", picture("JPEG"), "mask")], "mask"),
    ("two masks", {"prompt": "p"}, [_image(), _image("m.png", field="mask"), _image("n.png", field="mask")], "mask"),
    ("bad input_fidelity", {"prompt": "p", "input_fidelity": "medium"}, [_image()], "input_fidelity"),
    ("input_fidelity on dall-e-2", {"prompt": "p", "model": "dall-e-2", "input_fidelity": "low"}, [_image()],
     "input_fidelity"),
    ("stream not a boolean", {"prompt": "p", "stream": "yes"}, [_image()], "stream"),
    ("partial_images without stream", {"prompt": "p", "partial_images": "2"}, [_image()], "partial_images"),
    ("output_compression above 100", {"prompt": "p", "output_compression": "101"}, [_image()],
     "output_compression"),
    ("bad size", {"prompt": "p", "size": "999x999"}, [_image()], "size"),
    ("image as a text field", {"prompt": "p", "image": "a.png"}, [], "image"),
    ("prompt as a file", {}, [_image(), ("prompt", ("p.txt", b"p", "text/plain"))], "prompt"),
    ("unknown model", {"prompt": "p", "model": "gpt-9"}, [_image()], "model"),
]


def test_bad_edits_are_refused_before_reaching_upstream(gateway: Service, stats: Any) -> None:
    for name, data, files, param in BAD_EDITS:
        r = post_edit(gateway, data, files)
        assert r.status_code == 400, (name, r.text)
        error = r.json()["error"]
        assert error["param"] == param, (name, error)
        assert error["type"] == "invalid_request_error" and error["code"] in ("invalid_value",
                                                                              "missing_required_parameter")
    not_multipart = httpx.post(gateway.url + "/v1/images/edits", json={"prompt": "p"}, headers=AUTH)
    assert not_multipart.status_code == 400
    many_parts = post_edit(gateway, [(f"x{i}", "") for i in range(200)], [_image()])
    assert many_parts.status_code == 400 and "at most 100" in many_parts.json()["error"]["message"]
    truncated = httpx.post(gateway.url + "/v1/images/edits",
                           content=b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\np',
                           headers={**AUTH, "content-type": "multipart/form-data; boundary=b"})
    assert truncated.status_code == 400 and truncated.json()["error"]["type"] == "invalid_request_error"
    assert stats()["requests"] == 0


def test_the_sdk_sees_a_refused_edit_as_bad_request(gateway: Service) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk(gateway).images.edit(image=("a.png", picture(), "image/png"), prompt="p", model="dall-e-3")
    assert info.value.param == "model"


def test_body_limit_with_and_without_content_length(gateway: Service, stats: Any) -> None:
    big = picture() + b"\0" * EDIT_LIMIT
    declared = post_edit(gateway, {"prompt": "p"}, [_image(data=big)])
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"
    boundary = "limit-test-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\np\r\n--{boundary}\r\n'
            'Content-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n')

    def chunked() -> Iterator[bytes]:
        yield head.encode()
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
        yield f"\r\n--{boundary}--\r\n".encode()

    r = httpx.post(gateway.url + "/v1/images/edits", content=chunked(), timeout=60,
                   headers={**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "content-length" not in r.request.headers  # it really was chunked
    assert stats()["requests"] == 0


def test_a_client_gone_mid_upload_is_one_info_line(gateway: Service, stats: Any) -> None:
    before = gateway.log().count("client disconnected mid-upload")
    request = (f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
               "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
               '--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\np\r\n').encode()
    with socket.create_connection(("127.0.0.1", gateway.port)) as conn:
        conn.sendall(request)
    wait_until(lambda: gateway.log().count("client disconnected mid-upload") == before + 1, "log line")
    assert "Traceback" not in gateway.log()
    assert stats()["requests"] == 0


def admin(gateway: Service, path: str, **params: str) -> httpx.Response:
    return httpx.get(gateway.url + path, params=params, headers={"authorization": f"Bearer {ADMIN_TOKEN}"})


def metric(gateway: Service, name: str, **labels: str) -> float:
    text = httpx.get(gateway.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_an_edit_in_flight_is_counted_under_its_route(gateway: Service, stats: Any) -> None:
    # The fake holds the answer 5 s (its latency knob, a form field the gateway passes on unchanged).
    done = threading.Event()

    def slow_edit() -> None:
        post_edit(gateway, {"prompt": "p", "fake": '{"latency": 5}'}, [_image()])
        done.set()

    threading.Thread(target=slow_edit, daemon=True).start()
    wait_until(lambda: metric(gateway, "gateway_inflight_requests", route="/v1/images/edits") == 1, "in flight")
    assert metric(gateway, "gateway_inflight_requests", route="/v1/images/generations") == 0
    assert done.wait(60)
    assert metric(gateway, "gateway_inflight_requests", route="/v1/images/edits") == 0


def test_input_image_tokens_reach_totals_records_and_metrics(gateway: Service, stats: Any) -> None:
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    before = admin(gateway, "/admin/usage", user="edith", period=day).json()
    tokens_before = metric(gateway, "gateway_usage_tokens_total", user="edith", kind="input_image")
    requests_before = metric(gateway, "gateway_requests_total", route="/v1/images/edits", status="200")
    images = [("a.png", picture(), "image/png"), ("b.png", picture(colour="green"), "image/png"),
              ("c.png", picture(colour="white"), "image/png")]
    sdk(gateway).images.edit(image=images, prompt="bill me", model="gpt-image-1")
    sdk(gateway).images.generate(prompt="and a generation", model="gpt-image-1")
    reported = 3 * INPUT_IMAGE_TOKENS
    assert stats()["usage"]["input_image_tokens"] == reported
    after = admin(gateway, "/admin/usage", user="edith", period=day).json()
    assert after["input_image_tokens"] - before["input_image_tokens"] == reported
    assert after["requests"] - before["requests"] == 2
    assert metric(gateway, "gateway_usage_tokens_total", user="edith", kind="input_image") - tokens_before == reported
    assert metric(gateway, "gateway_requests_total", route="/v1/images/edits", status="200") - requests_before == 1
    window = {"from": (datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
              "to": (datetime.now(UTC) + timedelta(minutes=1)).isoformat(), "user": "edith"}
    records = [r for r in map(_json, admin(gateway, "/admin/usage/records", **window).text.splitlines())]
    edit = next(r for r in records if r["route"] == "edits" and r["input_image_tokens"] == reported)
    assert edit["model"] == "gpt-image-1" and edit["status"] == 200
    # usd: 10 per 1M input image tokens (micro-dollars per token), plus text and output
    assert float(edit["usd"]) >= reported * 10 / 1_000_000
    assert any(r["route"] == "generations" for r in records)
    csv_rows = admin(gateway, "/admin/usage/records", **window, format="csv").text.splitlines()
    header = csv_rows[0].split(",")
    assert "route" in header
    routes = {row.split(",")[header.index("route")] for row in csv_rows[1:]}
    assert {"edits", "generations"} <= routes


def _json(line: str) -> dict[str, Any]:
    import json

    return json.loads(line)  # type: ignore[no-any-return]


def test_images_per_minute_counts_an_edits_n(gateway: Service, stats: Any) -> None:
    client = sdk(gateway, LIMITED_KEY)
    client.images.edit(image=("a.png", picture(), "image/png"), prompt="p", model="gpt-image-1", n=2)
    with pytest.raises(openai.RateLimitError) as info:
        client.images.edit(image=("a.png", picture(), "image/png"), prompt="p", model="gpt-image-1", n=2)
    assert info.value.code == "rate_limit_exceeded"
    client.images.edit(image=("a.png", picture(), "image/png"), prompt="p", model="gpt-image-1", n=1)
    assert stats()["usage"]["images"] == 3
