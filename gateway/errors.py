"""The gateway's error tree and its OpenAI-shaped rendering.

Every error a client sees is a ``GatewayError``; foreign errors (aiohttp, redis)
are translated where they enter, ``raise UpstreamUnavailable(...) from exc``.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class GatewayError(Exception):
    """An error answered to the client in OpenAI's shape."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_response(self, request_id: str | None = None) -> Response:
        headers = dict(self.headers)
        if request_id:
            headers["x-request-id"] = request_id
        return Response(orjson.dumps(self.body()), status_code=self.status, headers=headers,
                        media_type="application/json")


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class MissingParameter(InvalidRequest):
    code = "missing_required_parameter"


class RequestTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ClientGone(GatewayError):
    """The client went away before its request body arrived (nginx's 499; nobody reads the answer)."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class HeadersTooLarge(GatewayError):
    """Request line and headers over ``server.max_header_bytes`` (answered by the HTTP protocol)."""

    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class HeadersTimeout(GatewayError):
    """Headers not complete within ``server.header_timeout_seconds`` (answered by the HTTP protocol)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class BodyTimeout(HeadersTimeout):
    """A request body that stopped arriving, or arrives too slowly (``server.body_timeout_seconds``,
    ``server.body_min_bytes_per_second``): the same 408, answered by the HTTP protocol."""


class OperatorTokenRefused(GatewayError):
    """An operator endpoint without its bearer token; the message names the variable that sets it."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, what: str, variable: str) -> None:
        super().__init__(f"Incorrect {what} token provided. Use 'Authorization: Bearer <{variable}>'.",
                         headers={"www-authenticate": "Bearer"})


class MetricsUnauthorized(OperatorTokenRefused):
    """/metrics without ``Authorization: Bearer $GATEWAY_METRICS_TOKEN`` (when that is set)."""

    def __init__(self) -> None:
        super().__init__("metrics", "GATEWAY_METRICS_TOKEN")


class AdminUnauthorized(OperatorTokenRefused):
    """/admin/* without ``Authorization: Bearer $GATEWAY_ADMIN_TOKEN``."""

    def __init__(self) -> None:
        super().__init__("admin", "GATEWAY_ADMIN_TOKEN")


class InvalidApiKey(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self) -> None:
        # One message for missing, unknown, revoked and expired keys, so keys can't be probed.
        super().__init__("Incorrect API key provided. Use a valid gateway key in 'Authorization: Bearer <key>'.")


class ModelNotAllowed(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class IdempotencyKeyReused(GatewayError):
    """The Idempotency-Key was first used with another request (route or body)."""

    status = 422
    type = "invalid_request_error"
    code = "idempotency_key_reused"


class IdempotencyKeyInUse(GatewayError):
    """The request holding this Idempotency-Key did not finish within the wait bound."""

    status = 409
    type = "invalid_request_error"
    code = "idempotency_key_in_use"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = None


class RateLimited(GatewayError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.limit_name = limit_name  # e.g. "requests_per_minute", for the rate-limited metric


class QuotaExceeded(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, *, limit_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        # The quota stays used up until its period ends: retrying now only wastes calls.
        self.headers.setdefault("x-should-retry", "false")
        self.limit_name = limit_name  # e.g. "tokens_per_day", for the rate-limited metric


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class ShuttingDown(ServiceUnavailable):
    """The gateway stopped before the upstream answered; the upstream call still completes and is billed."""

    def __init__(self) -> None:
        super().__init__("The gateway is shutting down; your request is still being completed upstream and will be "
                         "billed. Retry with the same Idempotency-Key to get its answer instead of a second image.",
                         headers={"x-should-retry": "false", "retry-after": "1"})


class UpstreamAuthFailed(GatewayError):
    status = 502
    type = "server_error"
    code = "upstream_auth_failed"


class UpstreamUnavailable(GatewayError):
    status = 502
    type = "server_error"
    code = "upstream_unavailable"


class StorageUnavailable(GatewayError):
    """The image store failed; the message never carries its credentials."""

    status = 502
    type = "server_error"
    code = "storage_unavailable"


class UpstreamError(GatewayError):
    """An upstream error answer that was not in OpenAI's shape, relayed with its status."""

    type = "server_error"
    code = "upstream_error"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UpstreamTimeout(GatewayError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"

    def __init__(self, message: str) -> None:
        # The upstream may have generated (and billed) the image: retrying blindly doubles the bill.
        super().__init__(message, headers={"x-should-retry": "false"})


def sse_error_event(err: GatewayError) -> bytes:
    """The SSE event that ends a stream which failed after it had started."""
    return b"event: error\ndata: " + orjson.dumps(err.body()) + b"\n\n"
