"""The upstream (TTAPI) client: connection pool, key pool, error translation.

The engine is aiohttp's client: on this machine it relays 5-10x more requests per
second than httpx's AsyncClient through one worker (bench/RESULTS.md). Its pool is
sized for thousands of concurrent 10-120 s image calls.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.config import UpstreamSettings
from gateway.errors import UpstreamAuthFailed, UpstreamTimeout, UpstreamUnavailable
from gateway.upstream.form_body import FormBody

GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
# Client headers worth passing on; everything else (Authorization, Cookie, OpenAI-Organization,
# OpenAI-Project, hop-by-hop headers, any other credential-like header) stays at the gateway.
# Idempotency-Key goes upstream only namespaced per user (the caller passes it).
FORWARDED_HEADERS = ("accept", "user-agent")


class KeyPool:
    """Upstream keys used round-robin; a key the upstream refuses rests for a while."""

    def __init__(self, keys: tuple[str, ...], rest_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._keys = keys
        self._rest_seconds = rest_seconds
        self._clock = clock
        self._next = itertools.cycle(range(len(keys))) if keys else None
        self._resting_until: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def order(self) -> list[int]:
        """Key indexes to try for one request: usable keys round-robin; all resting: one probe."""
        if self._next is None:
            return []
        first = next(self._next)
        ring = [(first + i) % len(self._keys) for i in range(len(self._keys))]
        now = self._clock()
        usable = [i for i in ring if self._resting_until.get(i, 0.0) <= now]
        if usable:
            return usable
        return [min(ring, key=lambda i: self._resting_until[i])]

    def key(self, index: int) -> str:
        return self._keys[index]

    def refuse(self, index: int) -> None:
        self._resting_until[index] = self._clock() + self._rest_seconds


@dataclass(slots=True)
class UpstreamReply:
    """An upstream response whose headers have arrived; the body is read by the relay."""

    response: aiohttp.ClientResponse
    started: float  # monotonic time the request was sent

    @property
    def is_event_stream(self) -> bool:
        return self.response.content_type == "text/event-stream"


class UpstreamClient:
    """Sends image requests (generations, edits) to the upstream with the gateway's own key."""

    def __init__(self, settings: UpstreamSettings, *, session: aiohttp.ClientSession | None = None) -> None:
        self.settings = settings
        self.base_url = settings.base_url
        self.url = settings.base_url + GENERATIONS_PATH
        self.pool = KeyPool(settings.api_keys, settings.key_rest_seconds)
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_seconds,
                                              connect=settings.connect_timeout_seconds)
        self._session = session

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.settings.max_connections, limit_per_host=0,
                                             keepalive_timeout=10, ttl_dns_cache=300)
            # No cookie jar: the one session carries every user's requests, so a cookie the upstream (or a
            # proxy before it) set on one answer would go out with everyone's next request. Also a lookup less.
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                                  auto_decompress=False, read_bufsize=1 << 18,
                                                  skip_auto_headers=("User-Agent",),
                                                  cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, body: bytes | FormBody, client_headers: Mapping[str, str], request_id: str, *,
                   idempotency_key: str | None = None, path: str = GENERATIONS_PATH) -> UpstreamReply:
        """POST ``body`` (the validated request as JSON, or an edit's form) to ``path``; next key on 401/403."""
        assert self._session is not None, "UpstreamClient.start() not called"
        headers = {name: client_headers[name] for name in FORWARDED_HEADERS if name in client_headers}
        headers["content-type"] = "application/json"
        if isinstance(body, FormBody):  # a fresh body: its own boundary, its exact length
            headers["content-type"] = body.content_type
            headers["content-length"] = str(body.size)
        if idempotency_key is not None:
            headers["idempotency-key"] = idempotency_key
        headers["accept-encoding"] = "identity"  # relay bytes as they are; never re-compress SSE
        headers["x-request-id"] = request_id
        order = self.pool.order()
        if not order:
            raise UpstreamAuthFailed("The gateway has no upstream key configured (TTAPI_API_KEY).")
        for index in order:
            headers["tt-api-key"] = self.pool.key(index)
            started = time.monotonic()
            try:
                # Never follow redirects: aiohttp would carry TT-API-KEY to whatever host they name.
                data = body.payload() if isinstance(body, FormBody) else body
                response = await self._session.post(self.base_url + path, data=data, headers=headers,
                                                    allow_redirects=False)
            except aiohttp.ConnectionTimeoutError as exc:
                raise UpstreamUnavailable("The upstream could not be reached (connect timed out).") from exc
            except TimeoutError as exc:
                raise UpstreamTimeout(
                    f"The upstream did not answer within {self.settings.timeout_seconds:g} s.") from exc
            except aiohttp.ClientError as exc:
                raise UpstreamUnavailable(f"The upstream could not be reached ({type(exc).__name__}).") from exc
            if response.status in (401, 403):
                response.release()
                self.pool.refuse(index)
                continue
            if 300 <= response.status < 400:
                response.release()
                raise UpstreamUnavailable(f"The upstream answered with a redirect ({response.status}); "
                                          "check upstream.base_url.")
            return UpstreamReply(response, started)
        raise UpstreamAuthFailed("The upstream refused the gateway's credentials.")


def translate_read_error(exc: BaseException, timeout_seconds: float) -> UpstreamTimeout | UpstreamUnavailable:
    """The gateway error for a failure while reading an upstream body.

    The upstream had already answered, so it may have generated (and billed) the images:
    tell SDKs not to retry, as for a timeout.
    """
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"The upstream did not finish within {timeout_seconds:g} s.")
    err = UpstreamUnavailable(f"The upstream connection failed mid-response ({type(exc).__name__}).")
    err.headers["x-should-retry"] = "false"
    return err


READ_ERRORS = (aiohttp.ClientError, TimeoutError)


def salvage(content: Any) -> list[bytes]:
    """Bytes aiohttp had received when the connection failed: its reads raise before handing them over.

    They are events the upstream sent (and billed), so they are forwarded and counted.
    """
    buffered = getattr(content, "_buffer", None)
    if not buffered:
        return []
    chunks = list(buffered)
    offset = getattr(content, "_buffer_offset", 0)
    if offset:
        chunks[0] = chunks[0][offset:]
    buffered.clear()
    return chunks


def never_sent(exc: BaseException | None) -> bool:
    """Whether an upstream call failed before the request reached the upstream (connect failed)."""
    return isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
