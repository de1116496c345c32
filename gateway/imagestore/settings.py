"""The ``storage:`` section's settings and checks; parsed by gateway/config.py, which has no room left.

Kept free of imports from the rest of the gateway, so config.py can import it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's bucket naming rules
ENDPOINT_RE = re.compile(r"^https?://[^/\s@]+/?$")  # no path, and no user:password@ (credentials come from env)
MAX_URL_TTL = 7 * 24 * 3600  # SigV4 presigned URLs live at most 7 days


@dataclass(frozen=True)
class StorageSettings:
    """The image store; ``endpoint_url`` None: no store. Credentials only from the environment, never repr'd."""

    FROM_ENV = ("access_key_id", "secret_access_key")  # not accepted in the file

    endpoint_url: str | None = None  # env STORAGE_ENDPOINT_URL overrides
    public_endpoint_url: str = ""  # the host presigned URLs name, when clients reach S3 elsewhere; "": endpoint_url
    bucket: str = "images"
    region: str = "us-east-1"
    url_ttl_seconds: int = 3600  # presigned GET URLs
    path_style: bool = True  # http://host/bucket/key (MinIO, SeaweedFS); false: http://bucket.host/key
    timeout_seconds: float = 10.0  # connecting, and each read, of one store call
    access_key_id: str | None = field(default=None, repr=False)  # STORAGE_ACCESS_KEY_ID
    secret_access_key: str | None = field(default=None, repr=False)  # STORAGE_SECRET_ACCESS_KEY

    @property
    def enabled(self) -> bool:
        return self.endpoint_url is not None

    def problems(self, endpoint_url: object) -> Iterator[tuple[str, str]]:
        """(key, reason) for each value that is out of range."""
        if endpoint_url is not None and not (isinstance(endpoint_url, str) and ENDPOINT_RE.match(endpoint_url)):
            yield "endpoint_url", "must be null or an http(s) URL without path or credentials"
        if self.public_endpoint_url and not ENDPOINT_RE.match(self.public_endpoint_url):
            yield "public_endpoint_url", "must be empty or an http(s) URL without path or credentials"
        if not BUCKET_RE.match(self.bucket):
            yield "bucket", f"not a valid S3 bucket name: {self.bucket!r}"
        if not 1 <= self.url_ttl_seconds <= MAX_URL_TTL:
            yield "url_ttl_seconds", f"must be 1 to {MAX_URL_TTL} (7 days, the most a presigned URL can live)"

    def with_env(self, endpoint_url: str | None, env: Mapping[str, str]) -> StorageSettings:
        """These settings with the endpoint and the credentials from the environment."""
        return replace(self, endpoint_url=endpoint_url.rstrip("/") if endpoint_url else None,
                       public_endpoint_url=self.public_endpoint_url.rstrip("/"),
                       access_key_id=env.get("STORAGE_ACCESS_KEY_ID") or None,
                       secret_access_key=env.get("STORAGE_SECRET_ACCESS_KEY") or None)
