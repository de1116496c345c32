"""Stored answers: what the first request of an Idempotency-Key answered, and its replay."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from starlette.responses import Response

from gateway.errors import GatewayError, UpstreamAuthFailed, UpstreamUnavailable
from gateway.upstream.client import never_sent

# Headers a replay repeats: the body's type and the retry advice. Rate-limit headers belong to
# the first request's admission, and a replay is not admitted.
KEPT_HEADERS = ("content-type", "x-should-retry")
REPLAYED_HEADER = "idempotent-replayed"


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer as the client received it: status, the kept headers, the body bytes."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def encoded_headers(self) -> bytes:
        return orjson.dumps(dict(self.headers))


def answer_of(status: int, content_type: str, chunks: list[bytes]) -> Answer:
    """The answer the client gets from an upstream reply (JSON chunks or a stream's event bytes)."""
    return Answer(status, (("content-type", content_type),), b"".join(chunks))


def answer_of_error(err: GatewayError) -> Answer:
    """The answer ``err.to_response`` sends, byte for byte."""
    kept = tuple((k.lower(), v) for k, v in err.headers.items() if k.lower() in KEPT_HEADERS)
    return Answer(err.status, (("content-type", "application/json"), *kept), orjson.dumps(err.body()))


def decode_answer(status: bytes, headers: bytes, body: bytes) -> Answer:
    return Answer(int(status), tuple(orjson.loads(headers).items()), body)


def may_have_billed(err: GatewayError) -> bool:
    """Whether the upstream may have run (and billed) a request that ended in ``err``.

    Not when it refused the gateway's key, or was never reached (connect failed, or an answer
    with no cause such as a redirect): those are the gateway's own answers, not stored.
    """
    if isinstance(err, UpstreamAuthFailed):
        return False
    if isinstance(err, UpstreamUnavailable):
        return err.__cause__ is not None and not never_sent(err.__cause__)
    return True


def replay_response(answer: Answer, request_id: str) -> Response:
    """The stored answer for a repeat, marked ``idempotent-replayed: true``."""
    headers = {**dict(answer.headers), REPLAYED_HEADER: "true", "x-request-id": request_id}
    return Response(answer.body, status_code=answer.status, headers=headers)
