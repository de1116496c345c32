"""ImageStore against a real SeaweedFS (weed server -s3 with an identity): no mocks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from aiobotocore.session import get_session
from prometheus_client import CollectorRegistry

from gateway.devtools.fake_images import encode, png
from gateway.devtools.seaweed import SeaweedS3
from gateway.errors import StorageUnavailable
from gateway.imagestore import store as store_module
from gateway.imagestore.responses import images_as_urls
from gateway.imagestore.store import ImageStore
from gateway.metering.metrics import STORAGE_OPS, Metrics
from tests.support.seaweed import S3Store

IMAGE = png(b"store-test", pad_bytes=200_000)


def storage_errors(metrics: Metrics, op: str) -> float:
    value = metrics.registry.get_sample_value("gateway_storage_errors_total", {"op": op})
    assert value is not None  # pre-created at zero
    return value


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
async def store(s3_store: S3Store, metrics: Metrics) -> AsyncIterator[ImageStore]:
    image_store = ImageStore(s3_store.settings(), metrics)
    await image_store.start()
    yield image_store
    await image_store.close()


async def bucket_keys(s3_store: S3Store) -> list[str] | None:
    return await s3_store.object_keys()


async def download(url: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(url)


async def test_start_creates_the_missing_bucket_and_two_replicas_racing_both_start(s3_store: S3Store,
                                                                                    metrics: Metrics) -> None:
    assert await bucket_keys(s3_store) is None
    replicas = [ImageStore(s3_store.settings(), metrics) for _ in range(2)]
    await asyncio.gather(*(r.start() for r in replicas))
    try:
        assert await bucket_keys(s3_store) == []
        again = ImageStore(s3_store.settings(), metrics)  # a restart finds the bucket there
        await again.start()
        await again.close()
    finally:
        for r in replicas:
            await r.close()
    assert storage_errors(metrics, "start") == 0


async def test_a_stored_image_downloads_byte_exact_through_its_presigned_url(store: ImageStore) -> None:
    key = await store.put_image(IMAGE)
    answer = await download(await store.presigned_url(key))
    assert answer.status_code == 200
    assert answer.content == IMAGE
    assert answer.headers["content-type"] == "image/png"


async def test_urls_name_the_public_endpoint_when_clients_reach_the_store_elsewhere(s3_store: S3Store,
                                                                                  metrics: Metrics) -> None:
    internal = s3_store.endpoint.replace("127.0.0.1", "localhost")
    store = ImageStore(s3_store.settings(endpoint_url=internal, public_endpoint_url=s3_store.endpoint), metrics)
    await store.start()
    try:
        url = await store.presigned_url(await store.put_image(IMAGE))
    finally:
        await store.close()
    assert url.startswith(s3_store.endpoint + "/")
    assert (await download(url)).content == IMAGE


async def test_the_url_without_or_with_a_tampered_signature_is_refused(store: ImageStore) -> None:
    url = await store.presigned_url(await store.put_image(IMAGE))
    parts = urlsplit(url)
    unsigned = urlunsplit(parts._replace(query=""))
    query = dict(parse_qsl(parts.query))
    signature = query["X-Amz-Signature"]
    query["X-Amz-Signature"] = ("0" if signature[0] != "0" else "1") + signature[1:]
    tampered = urlunsplit(parts._replace(query=urlencode(query)))
    for refused in (unsigned, tampered):
        answer = await download(refused)
        assert answer.status_code == 403
        assert IMAGE[:64] not in answer.content


async def test_the_same_bytes_get_the_same_key_and_are_stored_once(store: ImageStore, s3_store: S3Store) -> None:
    first = await store.put_image(IMAGE)
    second = await store.put_image(bytes(IMAGE))
    assert first == second == hashlib.sha256(IMAGE).hexdigest() + ".png"
    assert await bucket_keys(s3_store) == [first]


async def test_an_image_expired_by_a_lifecycle_rule_is_uploaded_again_after_the_hour(store: ImageStore,
                                                                                    s3_store: S3Store) -> None:
    key = await store.put_image(IMAGE)
    async with get_session().create_client("s3", endpoint_url=s3_store.endpoint, region_name="us-east-1",
                                           aws_access_key_id=s3_store.access_key,
                                           aws_secret_access_key=s3_store.secret_key) as s3:
        await s3.delete_object(Bucket=s3_store.bucket, Key=key)  # what the lifecycle rule does after N days
    store._known[key] -= 3601  # the process stored it over an hour ago
    assert await store.put_image(IMAGE) == key
    assert (await download(await store.presigned_url(key))).content == IMAGE


async def test_the_extension_comes_from_the_magic_bytes(store: ImageStore) -> None:
    jpeg, webp, other = encode("jpeg", b"x"), encode("webp", b"x"), b"not an image"
    keys = [await store.put_image(data) for data in (jpeg, webp, other)]
    assert [k.rsplit(".", 1)[1] for k in keys] == ["jpg", "webp", "bin"]
    answer = await download(await store.presigned_url(keys[0]))
    assert (answer.content, answer.headers["content-type"]) == (jpeg, "image/jpeg")


async def test_blobs_round_trip_and_a_missing_blob_is_none(store: ImageStore) -> None:
    await store.put_blob("idempotency/abc", b"\x00answer" * 1000)
    assert await store.get_blob("idempotency/abc") == b"\x00answer" * 1000
    assert await store.get_blob("idempotency/missing") is None


async def test_files_stream_in_and_out_and_deleted_keys_are_gone(store: ImageStore, s3_store: S3Store) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # several read chunks, not a multiple of one
    with tempfile.TemporaryFile() as source, tempfile.TemporaryFile() as copy:
        source.write(data)
        await store.put_file("jobs/j1/0.png", source, len(data))
        assert await store.get_file("jobs/j1/0.png", copy) == len(data)
        copy.seek(0)
        assert copy.read() == data
        assert await store.get_file("jobs/j1/missing.png", copy) is None
    await store.put_blob("jobs/j1/1.png", b"x")
    await store.put_blob("kept.png", b"y")
    await store.delete(["jobs/j1/0.png", "jobs/j1/1.png", "jobs/j1/never-stored.png"])
    assert await bucket_keys(s3_store) == ["kept.png"]


async def test_images_as_urls_stores_each_image_and_keeps_every_other_field(store: ImageStore) -> None:
    images = [IMAGE, encode("webp", b"second")]
    body: dict[str, Any] = {
        "created": 1764400000,
        "data": [{"b64_json": base64.b64encode(img).decode(), "revised_prompt": f"p{i}"}
                 for i, img in enumerate(images)],
        "usage": {"input_tokens": 12, "output_tokens": 4160, "total_tokens": 4172,
                  "input_tokens_details": {"text_tokens": 12, "image_tokens": 0}},
        "output_format": "png", "size": "1024x1024", "quality": "low",
    }
    answer = await images_as_urls(store, body)
    assert {k: v for k, v in answer.items() if k != "data"} == {k: v for k, v in body.items() if k != "data"}
    assert [sorted(item) for item in answer["data"]] == [["revised_prompt", "url"]] * 2
    assert [item["revised_prompt"] for item in answer["data"]] == ["p0", "p1"]
    for item, img in zip(answer["data"], images, strict=True):
        assert (await download(item["url"])).content == img
    assert "b64_json" in body["data"][0]  # the caller's body is left as it was


async def test_a_stopped_store_is_storage_unavailable_counted_and_names_no_credential(metrics: Metrics) -> None:
    weed = SeaweedS3().start()
    try:
        s3 = S3Store(weed)
        store = ImageStore(s3.settings(timeout_seconds=30.0), metrics)
        await store.start()
        key = await store.put_image(IMAGE)
        weed.stop()
        with pytest.raises(StorageUnavailable) as put_failed:
            await store.put_image(png(b"after the stop"))
        with pytest.raises(StorageUnavailable) as get_failed:
            await store.get_blob(key)
        await store.close()
    finally:
        weed.cleanup()
    assert (storage_errors(metrics, "put"), storage_errors(metrics, "get")) == (1, 1)
    for failed in (put_failed.value, get_failed.value):
        assert (failed.status, failed.code, failed.type) == (502, "storage_unavailable", "server_error")
        text = str(failed.body())
        assert weed.access_key not in text and weed.secret_key not in text


async def test_a_wrong_secret_fails_start_without_naming_the_credentials(s3_store: S3Store,
                                                                         metrics: Metrics) -> None:
    store = ImageStore(s3_store.settings(secret_access_key="wrong-" + s3_store.secret_key), metrics)
    with pytest.raises(StorageUnavailable) as failed:
        await store.start()
    await store.close()
    assert storage_errors(metrics, "start") == 1
    text = str(failed.value.body())
    assert s3_store.access_key not in text and s3_store.secret_key not in text
    assert await bucket_keys(s3_store) is None


def test_the_pre_created_storage_ops_are_exactly_the_ones_the_store_emits() -> None:
    source = Path(store_module.__file__).read_text()
    assert set(re.findall(r'self\._call\("([a-z]+)"\)', source)) == set(STORAGE_OPS)
