"""``ImageStore``: images and blobs in one private S3 bucket, read back through presigned GET URLs.

The client is aiobotocore (aiohttp underneath, like the upstream client; chosen by
measurement, see bench/RESULTS.md "Image-store client"). Every client failure is
translated here into ``StorageUnavailable`` (502) and counted in
``gateway_storage_errors_total{op}``; neither the error nor the log line carries a credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import IO, Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from gateway.errors import StorageUnavailable
from gateway.imagestore.naming import content_key, media_type
from gateway.imagestore.settings import StorageSettings
from gateway.metering.metrics import Metrics

log = logging.getLogger("gateway.imagestore")

# Everything aiobotocore raises for a store that is down, slow, or refusing us.
_FAILURES = (BotoCoreError, ClientError, aiohttp.ClientError, asyncio.TimeoutError, OSError)
_MISSING = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_KNOWN_KEYS = 10_000  # keys this process stored lately: a repeat put of the same image is skipped ...
_CHUNK = 1 << 16  # bytes per read when an object is copied to a file
_KNOWN_SECONDS = 3600.0  # ... within an hour: a bucket lifecycle rule may have expired an older object


def _error_code(exc: BaseException) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) if isinstance(exc, ClientError) else ""


def _describe(exc: BaseException) -> str:
    # S3 error bodies can echo the string-to-sign and the access key id: log the code only.
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{_error_code(exc) or 'error'} (HTTP {status})"
    return type(exc).__name__


class ImageStore:
    """One bucket of an S3-compatible service; ``await start()`` before use, ``await close()`` after."""

    def __init__(self, settings: StorageSettings, metrics: Metrics) -> None:
        if settings.endpoint_url is None:
            raise ValueError("ImageStore needs storage.endpoint_url")
        self.settings = settings
        self.bucket = settings.bucket
        self._metrics = metrics
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._signer: Any = None  # the client presigned URLs are made with (another host when public_endpoint_url)
        self._known: OrderedDict[str, float] = OrderedDict()  # key -> when stored (monotonic)

    def _config(self) -> AioConfig:
        s = self.settings
        return AioConfig(
            signature_version="s3v4",
            s3={"addressing_style": "path" if s.path_style else "virtual"},
            connect_timeout=s.timeout_seconds, read_timeout=s.timeout_seconds,
            retries={"mode": "standard", "total_max_attempts": 2},  # a dead store fails fast, not after 5 tries
            # Only where S3 requires them: several S3-compatible services refuse the newer CRC trailers.
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
            ignore_configured_endpoint_urls=True,  # AWS_ENDPOINT_URL* in the environment must not redirect us
            max_pool_connections=256,
        )

    @contextlib.asynccontextmanager
    async def _call(self, op: str) -> AsyncIterator[None]:
        """Translate a client failure of ``op`` into StorageUnavailable, counted and logged."""
        try:
            yield
        except _FAILURES as exc:
            self._metrics.storage_errors.labels(op).inc()
            log.warning("image store: %s failed: %s", op, _describe(exc))
            raise StorageUnavailable(f"The image store is unavailable ({op} failed); try again later.") from exc

    async def start(self) -> None:
        """Open the client and create the bucket if it is missing (two replicas racing is fine)."""
        s = self.settings
        async with self._call("start"):
            self._client = self._signer = await self._open(s.endpoint_url)
            if s.public_endpoint_url and s.public_endpoint_url != s.endpoint_url:
                # SigV4 signs the host: a URL for clients must be signed for the host they will ask.
                self._signer = await self._open(s.public_endpoint_url)
            if not await self._bucket_exists():
                await self._create_bucket()

    async def _open(self, endpoint_url: str | None) -> Any:
        s = self.settings
        return await self._stack.enter_async_context(get_session().create_client(
            "s3", endpoint_url=endpoint_url, region_name=s.region, config=self._config(),
            # None: botocore's own chain (AWS_* env, web identity / IRSA, instance role).
            aws_access_key_id=s.access_key_id, aws_secret_access_key=s.secret_access_key))

    async def _bucket_exists(self) -> bool:
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _error_code(exc) in _MISSING:
                return False
            raise
        return True

    async def _create_bucket(self) -> None:
        args: dict[str, Any] = {"Bucket": self.bucket}
        if self.settings.region != "us-east-1":  # S3 refuses a LocationConstraint of us-east-1
            args["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
        try:
            await self._client.create_bucket(**args)  # no ACL: objects stay private
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
            # Another replica won the race, or the name is someone else's: only a head tells which.
            await self._client.head_bucket(Bucket=self.bucket)
        log.info("image store: created bucket %s", self.bucket)

    async def put_image(self, data: bytes) -> str:
        """Store an image under its content address and return the key (same bytes, same key)."""
        key = content_key(data)
        stored_at = self._known.get(key)
        if stored_at is not None and time.monotonic() - stored_at < _KNOWN_SECONDS:
            return key
        # Without the local hint, a plain put: overwriting an object with its own bytes is harmless and
        # costs the same round trip a HEAD would.
        await self.put_blob(key, data)
        self._known[key] = time.monotonic()
        self._known.move_to_end(key)
        if len(self._known) > _KNOWN_KEYS:
            self._known.popitem(last=False)
        return key

    async def put_blob(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (overwriting)."""
        async with self._call("put"):
            await self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=media_type(key))

    async def get_blob(self, key: str) -> bytes | None:
        """The bytes stored under ``key``, or None when there is no such object."""
        buffer = io.BytesIO()
        return None if await self.get_file(key, buffer) is None else buffer.getvalue()

    async def put_file(self, key: str, file: IO[bytes], size: int) -> None:
        """Store ``size`` bytes read from ``file`` (from its start) under ``key``, streamed, not held in memory."""
        file.seek(0)
        async with self._call("put"):
            await self._client.put_object(Bucket=self.bucket, Key=key, Body=file, ContentLength=size,
                                          ContentType=media_type(key))

    async def get_file(self, key: str, file: IO[bytes]) -> int | None:
        """Write the object under ``key`` into ``file`` in chunks; its size, or None when there is no such object."""
        async with self._call("get"):
            try:
                answer = await self._client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _error_code(exc) in _MISSING:
                    return None
                raise
            size = 0
            async with answer["Body"] as body:
                while chunk := await body.read(_CHUNK):
                    file.write(chunk)
                    size += len(chunk)
        return size

    async def delete(self, keys: list[str]) -> None:
        """Remove ``keys`` (missing ones are fine)."""
        if not keys:
            return
        async with self._call("delete"):
            await self._client.delete_objects(Bucket=self.bucket,
                                              Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})

    async def delete_prefix(self, prefix: str) -> None:
        """Remove the objects whose keys start with ``prefix`` (the first 1,000: one job's files)."""
        async with self._call("delete"):
            answer = await self._client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        await self.delete([obj["Key"] for obj in answer.get("Contents", [])])

    async def presigned_url(self, key: str) -> str:
        """A GET URL for ``key`` that works for ``storage.url_ttl_seconds`` (signed locally, no round trip)."""
        async with self._call("presign"):
            url: str = await self._signer.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.settings.url_ttl_seconds)
        return url

    async def close(self) -> None:
        """Close the client's connections."""
        await self._stack.aclose()
        self._client = self._signer = None
