"""The usage observers read usage out of the upstream's bytes without altering them."""

from __future__ import annotations

import itertools
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.upstream.observe import (
    SMALL_JSON,
    USAGE_MAX,
    JsonUsage,
    JsonUsageScanner,
    SseUsageParser,
    Usage,
    usage_from_json,
)

USAGE = {"input_tokens": 12, "input_tokens_details": {"text_tokens": 9, "image_tokens": 3},
         "output_tokens": 4160, "total_tokens": 4172}


def _feed(parser: JsonUsageScanner | SseUsageParser, data: bytes, size: int) -> None:
    for i in range(0, len(data), size):
        parser.feed(data[i:i + size])


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 65536, 10**9])
def test_json_scanner_finds_usage_and_counts_images_at_any_chunking(chunk: int) -> None:
    body = orjson.dumps({"created": 1, "data": [{"b64_json": "A" * 200_000}, {"b64_json": 'q"\\u00e9"', "x": [1]}],
                         "usage": USAGE, "size": "1024x1024", "nested": {"usage": {"output_tokens": 1}}})
    scanner = JsonUsageScanner()
    _feed(scanner, body, chunk)
    usage = usage_from_json(scanner)
    assert (usage.images, usage.input_text_tokens, usage.input_image_tokens, usage.output_tokens,
            usage.total_tokens, usage.reported) == (2, 9, 3, 4160, 4172, True)


def test_json_scanner_without_usage_reports_none() -> None:
    scanner = JsonUsageScanner()
    scanner.feed(orjson.dumps({"created": 1, "data": [{"url": "http://x/1.png"}]}))
    usage = usage_from_json(scanner)
    assert usage.images == 1 and not usage.reported and usage.total_tokens == 0


def test_json_scanner_ignores_usage_inside_strings_and_nested_objects() -> None:
    scanner = JsonUsageScanner()
    scanner.feed(b'{"data": [{"revised_prompt": "a \\"usage\\": {1}"}], "meta": {"usage": {"output_tokens": 5}}}')
    assert usage_from_json(scanner).output_tokens == 0


_BODIES = [
    orjson.dumps({"created": 1, "data": [{"b64_json": "A" * 300}, {"url": "u"}, 3], "usage": USAGE}),
    orjson.dumps({"data": [{"b64_json": "A" * (SMALL_JSON + 10)}], "usage": USAGE, "error": None}),
    orjson.dumps({"data": {"a": {"x": 1}, "b": [1], "c": 2}, "error": {"message": "no"}}),
    orjson.dumps({"error": {"message": "boom", "type": "server_error"}}),
    b'{"data": [{"b64_json": "q\\\\"}], "usage": {"output_tokens": 18446744073709551616}}',  # 2**64: a float
    b'{"data": [{}], "usage": {"output_tokens": 3}} trailing',  # not JSON: scanned
    b'[{"usage": {"output_tokens": 3}}]',  # not an object
    b"<html>bad gateway</html>",
    b"",
]


@pytest.mark.parametrize("body", _BODIES)
@pytest.mark.parametrize("chunk", [1, 7, 4096, 10**9])
def test_json_usage_reads_what_the_scanner_reads(body: bytes, chunk: int) -> None:
    # Small bodies are parsed whole, large ones scanned: a client is billed the same either way.
    wanted = ("usage", "error")
    fast, scanner = JsonUsage(wanted), JsonUsageScanner(wanted)
    _feed(fast, body, chunk)
    _feed(scanner, body, chunk)
    assert fast.data_items == scanner.data_items
    assert [fast.value(w) for w in (*wanted, "data")] == [scanner.value(w) for w in (*wanted, "data")]
    assert usage_from_json(fast) == usage_from_json(scanner)


def test_usage_without_details_counts_input_as_text() -> None:
    usage = Usage()
    usage.add_openai({"input_tokens": 10, "output_tokens": 5})
    assert (usage.input_text_tokens, usage.input_image_tokens, usage.total_tokens) == (10, 0, 15)


def _event(name: str, data: dict[str, object], eol: bytes = b"\n") -> bytes:
    return b"event: " + name.encode() + eol + b"data: " + orjson.dumps(data) + eol + eol


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("chunk", [1, 5, 4096, 10**9])
def test_sse_parser_sums_completed_events(chunk: int, eol: bytes) -> None:
    partial = {"type": "image_generation.partial_image", "b64_json": "P" * 50_000, "partial_image_index": 0}
    done = {"type": "image_generation.completed", "b64_json": "C" * 50_000, "usage": USAGE}
    stream = _event("image_generation.partial_image", partial, eol) + _event("image_generation.completed", done, eol)
    stream += _event("image_generation.completed", done, eol)
    parser = SseUsageParser()
    _feed(parser, stream, chunk)
    parser.close()
    assert (parser.events, parser.completed, parser.usage.images) == (3, 2, 2)
    assert parser.usage.total_tokens == 2 * 4172 and parser.usage.input_image_tokens == 6


def test_sse_parser_reads_events_without_event_lines_and_upstream_errors() -> None:
    parser = SseUsageParser()
    parser.feed(b'data: {"type": "image_generation.completed", "usage": {"input_tokens": 1, "output_tokens": 2}}\n\n')
    parser.feed(b'event: error\ndata: {"error": {"message": "boom"}}\n\n')
    parser.close()
    assert parser.usage.total_tokens == 3 and parser.error == {"error": {"message": "boom"}}


def test_sse_parser_survives_a_type_that_is_not_a_string() -> None:
    """A "type" that is an object or array is no known type: the stream is still read and metered."""
    parser = SseUsageParser()
    parser.feed(b'data: {"type": [1], "usage": {"output_tokens": 99}}\n\n')  # no name, no known type
    parser.feed(b'event: image_generation.completed\ndata: {"type": {"a": 1}, "usage": {"output_tokens": 7}}\n\n')
    parser.close()
    assert (parser.events, parser.completed, parser.usage.output_tokens) == (2, 1, 7)

def test_sse_parser_counts_a_final_event_missing_its_blank_line() -> None:
    parser = SseUsageParser()
    parser.feed(b'event: image_generation.completed\ndata: {"usage": {"output_tokens": 7}}')
    assert parser.completed == 0
    parser.close()
    assert parser.completed == 1 and parser.usage.output_tokens == 7


@pytest.mark.parametrize(("reported", "expected"), [
    # (text, image, output, total) as the upstream sent them -> as recorded
    ({"input_tokens": 10, "output_tokens": 20, "total_tokens": 2**64 - 1}, (10, 0, 20, 30)),
    ({"input_tokens": 10, "output_tokens": 2**64 - 1, "total_tokens": 2**64 - 1}, (10, 0, 10**12, 10**12 + 10)),
    ({"input_tokens": 2**70, "input_tokens_details": {"text_tokens": 2**70, "image_tokens": 3},
      "output_tokens": 1}, (10**12, 3, 1, 10**12 + 4)),
    ({"input_tokens": 10, "output_tokens": 20, "total_tokens": 5}, (10, 0, 20, 30)),  # total below its parts
    ({"input_tokens": 10, "output_tokens": 20, "total_tokens": 31}, (10, 0, 20, 31)),
    ({"input_tokens": -5, "output_tokens": 1.5e300, "total_tokens": True}, (0, 0, 0, 0)),
])
def test_out_of_range_usage_is_clamped_and_the_total_kept_consistent(
        reported: dict[str, object], expected: tuple[int, int, int, int]) -> None:
    usage = Usage()
    usage.add_openai(reported)
    got = (usage.input_text_tokens, usage.input_image_tokens, usage.output_tokens, usage.total_tokens)
    assert got == expected
    assert all(0 <= v <= 2 * USAGE_MAX for v in got)


def test_sse_parser_counts_edit_events_as_generation_events() -> None:
    partial = {"type": "image_edit.partial_image", "b64_json": "P" * 1000, "partial_image_index": 0}
    done = {"type": "image_edit.completed", "b64_json": "C", "usage": USAGE}
    parser = SseUsageParser()
    parser.feed(_event("image_edit.partial_image", partial, b"\n") + _event("image_edit.completed", done, b"\n"))
    parser.feed(b'data: {"type": "image_edit.completed", "usage": {"input_tokens": 1, "output_tokens": 2}}\n\n')
    parser.close()
    assert (parser.events, parser.completed, parser.usage.images) == (3, 2, 2)
    assert parser.usage.input_image_tokens == 3 and parser.usage.total_tokens == 4172 + 3


def test_sse_parser_never_counts_a_truncated_final_event() -> None:
    head = (b"event: image_generation.completed\ndata: "
            b'{"type": "image_generation.completed", "usage": {"output_tokens": 7}')
    whole, cut = head + b"}\n\n", head + b', "b64_json": "QUJ'
    for clean in (True, False):
        parser = SseUsageParser()
        parser.feed(whole + cut)
        assert not parser.at_boundary
        parser.close(clean=clean)
        assert (parser.completed, parser.usage.output_tokens) == (1, 7)
    parser = SseUsageParser()
    parser.feed(whole + cut[:cut.index(b"data:")] + b'data: {"type": "image_generation.completed"}')
    parser.close(clean=False)  # whole, but the connection failed: not known to be complete
    assert parser.completed == 1


_JSON_TEXT = st.lists(st.sampled_from(['"', "\\", "\\", "a", "/", "{", "}", "[", "]", ",", ":", " ", "\n", "é",
                                        "\u2028", "\x00", "usage", "data"]), max_size=8).map("".join)
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | _JSON_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_JSON_TEXT, inner, max_size=4), max_leaves=12)
_TOP_KEYS = st.sampled_from(["usage", "error", "data", "created", "u\\sage", 'd"ata', "x"]) | _JSON_TEXT


def _containers_in(data: Any) -> int:
    items = data.values() if isinstance(data, dict) else data if isinstance(data, list) else []
    return sum(isinstance(item, dict | list) for item in items)


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(_TOP_KEYS, _JSON_VALUES, max_size=6), cuts=st.lists(st.integers(0, 400), max_size=8),
       ascii_only=st.booleans(), spaced=st.booleans())
def test_json_scanner_reads_any_object_at_any_chunking(doc: dict[str, Any], cuts: list[int], ascii_only: bool,
                                                      spaced: bool) -> None:
    """Strings full of quotes and backslashes, cut anywhere: the scanner reads what a parser reads."""
    body = json.dumps(doc, ensure_ascii=ascii_only, indent=1 if spaced else None).encode()
    bounds = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    scanner = JsonUsageScanner(("usage", "error"))
    for start, stop in itertools.pairwise(bounds):
        scanner.feed(body[start:stop])
    assert not scanner.broken
    assert scanner.value("usage") == doc.get("usage") and scanner.value("error") == doc.get("error")
    assert scanner.data_items == _containers_in(doc.get("data"))
