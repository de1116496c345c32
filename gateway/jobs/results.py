"""A job's images in the image store: stored once when the job finishes, presigned whenever it is read.

The job keeps object keys, not URLs: a presigned URL lives ``storage.url_ttl_seconds`` while the
job is kept ``jobs.ttl_seconds``, so each read signs fresh URLs (locally, no round trip).
"""

from __future__ import annotations

import base64
import copy
from typing import Any, Protocol

import orjson


class Store(Protocol):
    """What jobs need of the image store (gateway/imagestore)."""

    async def put_image(self, data: bytes) -> str: ...

    async def presigned_url(self, key: str) -> str: ...


async def store_images(store: Store, answer: bytes) -> dict[str, Any]:
    """The upstream's ImagesResponse with each ``b64_json`` image stored, kept as its object key."""
    result: dict[str, Any] = orjson.loads(answer)
    for item in result.get("data") or []:
        if isinstance(item, dict) and isinstance(item.get("b64_json"), str):
            item["image_key"] = await store.put_image(base64.b64decode(item.pop("b64_json")))
    return result


async def with_urls(store: Store, result: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored result as users see it: each image as a presigned ``url``."""
    if result is None:
        return None
    shown = copy.deepcopy(result)
    for item in shown.get("data") or []:
        if isinstance(item, dict) and "image_key" in item:
            item["url"] = await store.presigned_url(item.pop("image_key"))
    return shown


async def job_object(store: Store | None, job: Any) -> dict[str, Any]:
    """The ``image.job`` object users see (the API and webhooks), images as freshly presigned URLs."""
    shown: dict[str, Any] = job.public()
    if store is not None:
        shown["result"] = await with_urls(store, job.result)
    return shown
