"""Stored answers: what the first request of an Idempotency-Key answered, and its replay."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from gateway.errors import GatewayError, UpstreamAuthFailed, UpstreamUnavailable
from gateway.upstream.client import never_sent
from gateway.upstream.delivery import ChunksResponse

# Headers a replay repeats: the body's type and the retry advice. Rate-limit headers belong to
# the first request's admission, and a replay is not admitted.
KEPT_HEADERS = ("content-type", "x-should-retry")
REPLAYED_HEADER = "idempotent-replayed"
REPLAY_CHUNK_BYTES = 1 << 16  # a replay's body is sent in slices of this size


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


def replay_response(answer: Answer, request_id: str, send_timeout_seconds: float) -> ChunksResponse:
    """The stored answer for a repeat, marked ``idempotent-replayed: true``.

    Sent as any relayed answer is: a client that stops reading is dropped after ``send_timeout_seconds``
    (SPEC §3), so a stalled repeat does not hold a stored answer of many MB for as long as it likes. The
    body goes in slices: the server buffers a whole send without waiting, so one send of it all would
    never wait for the client, and never time out.
    """
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers]
    headers += [(REPLAYED_HEADER.encode(), b"true"), (b"x-request-id", request_id.encode())]
    body = answer.body
    chunks = [body[i:i + REPLAY_CHUNK_BYTES] for i in range(0, len(body), REPLAY_CHUNK_BYTES)]
    return ChunksResponse(answer.status, chunks, headers, send_timeout_seconds)
