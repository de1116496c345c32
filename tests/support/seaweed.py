"""A SeaweedFS S3 service for tests: one weed process per session, a fresh bucket name per test.

The process itself is gateway/devtools/seaweed.py (the demo and bench/storage.py start the same one).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from gateway.devtools.seaweed import SeaweedS3
from gateway.imagestore.settings import StorageSettings

_buckets = itertools.count(1)


@dataclass
class S3Store:
    """Where the test's S3 service is, its credentials, and a bucket name no other test uses."""

    server: SeaweedS3
    bucket: str = field(default_factory=lambda: f"t{os.getpid()}-{next(_buckets)}")

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def access_key(self) -> str:
        return self.server.access_key

    @property
    def secret_key(self) -> str:
        return self.server.secret_key

    def settings(self, **overrides: object) -> StorageSettings:
        """StorageSettings for this service and bucket, as config.py would build them from file and env."""
        values: dict[str, object] = {"endpoint_url": self.endpoint, "bucket": self.bucket,
                                     "access_key_id": self.access_key, "secret_access_key": self.secret_key}
        return StorageSettings(**{**values, **overrides})  # type: ignore[arg-type]

    async def object_keys(self, prefix: str = "") -> list[str] | None:
        """The bucket's object keys under ``prefix`` as S3 lists them, or None if the bucket does not exist."""
        async with get_session().create_client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                               aws_access_key_id=self.access_key,
                                               aws_secret_access_key=self.secret_key) as s3:
            try:
                answer = await s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
            except ClientError as exc:
                if exc.response["Error"]["Code"] == "NoSuchBucket":
                    return None
                raise
        return [obj["Key"] for obj in answer.get("Contents", [])]

    def env(self) -> dict[str, str]:
        """The environment a gateway process would get."""
        return {"STORAGE_ENDPOINT_URL": self.endpoint, "STORAGE_ACCESS_KEY_ID": self.access_key,
                "STORAGE_SECRET_ACCESS_KEY": self.secret_key}
