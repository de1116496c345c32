"""What a job sends upstream: a generation's JSON in the job itself, an edit's files in the image store.

A generation job keeps its validated JSON in the job's hash (at most ``max_body_bytes``). An edit
(up to ``max_edit_body_bytes``, 64 MiB, text fields included) does not belong in Redis: at
submission each file is streamed from its spool to the image store under
``jobs/<job id>/<index>.<ext>``, beside a manifest ``jobs/<job id>/request.json`` (the text fields
as they go upstream; each file's field, filename, content type, size and key); the job keeps only
the list of those keys.
When the job runs, the files are streamed back into spooled temporary files, checked again by the
edit rules (the config may have changed since submission), and sent upstream as the same
multipart form. When the job ends, or was cancelled, its objects are deleted; the bucket's
lifecycle rule removes those of jobs that expired before they ran.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from gateway.config import Settings
from gateway.errors import StorageUnavailable
from gateway.http.form import SPOOL_MEMORY_BYTES
from gateway.imagestore.naming import image_extension
from gateway.pipeline.edit_rules import validate_edit
from gateway.pipeline.request import EDITS, ImageRequest, validate_image_request
from gateway.upstream.client import EDITS_PATH, GENERATIONS_PATH
from gateway.upstream.form_body import FilePart, FormBody

log = logging.getLogger("gateway.jobs")
MANIFEST = "request.json"  # an edit job's text fields and file list, beside its files


class InputStore(Protocol):
    """What an edit job needs of the image store (gateway/imagestore)."""

    async def put_file(self, key: str, file: Any, size: int) -> None: ...

    async def get_file(self, key: str, file: Any) -> int | None: ...

    async def put_blob(self, key: str, data: bytes) -> None: ...

    async def get_blob(self, key: str) -> bytes | None: ...

    async def delete(self, keys: list[str]) -> None: ...


class InputsGone(StorageUnavailable):
    """An edit job's files are no longer in the store (a lifecycle rule shorter than the queue's wait): final."""


@dataclass(slots=True)
class JobRequest:
    """A job's request as the runner sends it."""

    image: ImageRequest
    body: bytes | FormBody
    path: str = GENERATIONS_PATH

    def close(self) -> None:
        """Free the spooled files of an edit."""
        if isinstance(self.body, FormBody):
            self.body.close()


async def keep_edit(store: InputStore, job_id: str, form: FormBody) -> bytes:
    """Store an edit's files and its manifest for its job; the job's ``body``: where they are, a few hundred bytes.

    The manifest (text fields, up to the body limit, and each file's name and type) goes to the store
    too, not to Redis, where every user's limits live. A store failing midway deletes what was stored.
    """
    prefix = f"jobs/{job_id}/"
    keys: list[str] = []
    try:
        files = []
        for index, part in enumerate(form.files):
            key = f"{prefix}{index}.{image_extension(part.head(16))}"
            keys.append(key)
            await store.put_file(key, part.file, part.size)
            files.append({"field": part.field, "filename": part.filename, "content_type": part.content_type,
                          "size": part.size, "key": key})
        keys.append(prefix + MANIFEST)
        await store.put_blob(keys[-1], orjson.dumps({"fields": form.fields, "files": files}))
    except StorageUnavailable:
        with contextlib.suppress(StorageUnavailable):
            await store.delete(keys)
        raise
    return orjson.dumps({"keys": keys})


async def load(store: InputStore, settings: Settings, route: str, body: bytes) -> JobRequest:
    """The stored request, validated again; an edit's files fetched back (``InputsGone`` when they are not)."""
    if route != EDITS:
        return JobRequest(validate_image_request(orjson.loads(body), settings), body)
    keys = orjson.loads(body)["keys"]
    stored = await store.get_blob(keys[-1])
    if stored is None:
        raise InputsGone("The edit's input images are no longer in the image store.")
    manifest = orjson.loads(stored)
    files: list[FilePart] = []
    try:
        for spec in manifest["files"]:
            part = FilePart(spec["field"], spec["filename"], spec["content_type"],
                            tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES), spec["size"])
            files.append(part)
            if await store.get_file(spec["key"], part.file) != spec["size"]:
                raise InputsGone("The edit's input images are no longer in the image store.")
        fields = [(str(name), str(value)) for name, value in manifest["fields"]]
        image = validate_edit(fields, files, settings)
    except BaseException:
        FormBody([], files).close()
        raise
    return JobRequest(image, FormBody(fields, files), EDITS_PATH)


async def discard(store: InputStore | None, route: str, body: bytes) -> None:
    """Delete an edit job's stored files (a failure is logged: the lifecycle rule removes them later)."""
    if store is None or route != EDITS:
        return
    try:
        await store.delete(orjson.loads(body)["keys"])
    except StorageUnavailable:
        log.warning("the input images of an edit job could not be deleted; the bucket's lifecycle rule will")
