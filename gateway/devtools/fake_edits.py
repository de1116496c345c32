"""The fake TTAPI's side of ``POST /v1/images/edits``: read the multipart form as OpenAI would.

Files are streamed through a SHA-256 (never held whole, so a 50 MiB upload costs the fake
nothing), and what arrived is recorded for ``/_fake/stats``: each file's field name, filename,
content type, size and digest, and the text fields in order. Text fields become the JSON body
the generation path understands: ``n``, ``partial_images`` and ``output_compression`` as
integers, ``stream`` as a boolean, ``fake`` (knobs) as JSON.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from gateway.devtools.fake_answers import FakeError

_INTS = ("n", "partial_images", "output_compression")
IMAGE_FIELDS = ("image", "image[]")


async def read_edit_form(request: web.Request, entry: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The form as a JSON-like body, and the number of uploaded images; records what arrived in ``entry``."""
    fields: list[list[str]] = []
    files: list[dict[str, Any]] = []
    entry["fields"], entry["files"] = fields, files
    if request.content_type != "multipart/form-data":
        raise FakeError(400, "An edit must be sent as multipart/form-data.")
    try:
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader) or part.name is None:
                raise FakeError(400, "Every part of the form needs a name.")
            if part.filename is None:
                fields.append([part.name, await part.text()])
                continue
            digest, size = hashlib.sha256(), 0
            while chunk := await part.read_chunk(1 << 16):
                digest.update(chunk)
                size += len(chunk)
            files.append({"field": part.name, "filename": part.filename, "size": size,
                          "content_type": part.headers.get("Content-Type"), "sha256": digest.hexdigest()})
    except (ValueError, AssertionError) as exc:
        raise FakeError(400, f"We could not parse the multipart/form-data body ({exc}).") from exc
    body: dict[str, Any] = {}
    for name, value in fields:
        body[name] = _typed(name, value)
    images = sum(1 for f in files if f["field"] in IMAGE_FIELDS)
    if not images:
        raise FakeError(400, "Missing required parameter: 'image'.", "image", "missing_required_parameter")
    return body, images


def _typed(name: str, value: str) -> Any:
    if name in _INTS and value.lstrip("-").isdigit():
        return int(value)
    if name == "stream":
        return value == "true"
    if name == "fake":
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise FakeError(400, "'fake' must be a JSON object", "fake") from exc
    return value
