"""Turn an OpenAI ImagesResponse carrying base64 images into one carrying presigned URLs."""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

from gateway.errors import UpstreamError
from gateway.imagestore.store import ImageStore


def _decoded(item: dict[str, Any], index: int) -> bytes:
    try:
        return base64.b64decode(item["b64_json"], validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise UpstreamError(502, f"The upstream's image {index} is not valid base64.") from exc


async def _as_url(store: ImageStore, item: Any, index: int) -> Any:
    if not isinstance(item, dict) or not isinstance(item.get("b64_json"), str):
        return item
    url = await store.presigned_url(await store.put_image(_decoded(item, index)))
    # Same field order as the upstream's item, with `url` where `b64_json` was.
    return {("url" if k == "b64_json" else k): (url if k == "b64_json" else v) for k, v in item.items()}


async def images_as_urls(store: ImageStore, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with each ``data[i].b64_json`` stored and replaced by ``data[i].url``; other fields kept."""
    data = body.get("data")
    if not isinstance(data, list):
        return body
    # Every image is waited for (no upload left running behind the caller's back); the first failure is raised.
    items = await asyncio.gather(*(_as_url(store, item, i) for i, item in enumerate(data)), return_exceptions=True)
    for item in items:
        if isinstance(item, BaseException):
            raise item
    return {**body, "data": items}
