"""Usage observers: read the upstream's bytes on the side, never altering them.

``JsonUsageScanner`` finds the top-level ``usage`` object and counts ``data`` entries of
an images response incrementally, jumping over megabytes of base64 in C (``bytes.find``)
instead of parsing them. ``JsonUsage`` uses it only for a body past ``SMALL_JSON`` bytes: a
smaller one is parsed whole at its end (orjson: ~1 us for a 400-byte answer the scanner
takes ~28 us over), the same readings either way. ``SseUsageParser`` splits an SSE stream into events and sums
the usage of ``image_generation.completed`` and ``image_edit.completed`` events.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

_STRUCT = re.compile(rb'["{}\[\],:]')
# The most tokens one usage field may report. Larger values (2**64-1 has been seen) are an
# upstream bug: clamped here, before anything is priced or written to Redis, whose integer
# counters they would overflow half way through a settlement.
USAGE_MAX = 10**12
COMPLETED = "image_generation.completed"
COMPLETED_EVENTS = frozenset({COMPLETED, "image_edit.completed"})
_COMPLETED_NAMES = frozenset(name.encode() for name in COMPLETED_EVENTS)


@dataclass(slots=True)
class Usage:
    """Usage of one request as the upstream reported it."""

    input_text_tokens: int = 0
    input_image_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    images: int = 0
    reported: bool = False  # the upstream reported a usage object

    @property
    def input_tokens(self) -> int:
        return self.input_text_tokens + self.input_image_tokens

    def add_openai(self, usage: Any) -> None:
        """Add an OpenAI images ``usage`` object (input_tokens, input_tokens_details, output_tokens...).

        Each value is clamped to 0..USAGE_MAX; the total is the reported one if that is in range
        and at least the sum of the parts, else the sum of the parts.
        """
        if not isinstance(usage, dict):
            return
        inp = _int(usage.get("input_tokens"))
        details = usage.get("input_tokens_details")
        details = details if isinstance(details, dict) else {}
        text = _int(details.get("text_tokens")) if "text_tokens" in details else None
        image = _int(details.get("image_tokens"))
        if text is None:
            text = max(inp - image, 0)
        out = _int(usage.get("output_tokens"))
        parts = text + image + out
        total = usage.get("total_tokens")
        if not (isinstance(total, int) and not isinstance(total, bool) and parts <= total <= USAGE_MAX):
            total = parts
        self.input_text_tokens += text
        self.input_image_tokens += image
        self.output_tokens += out
        self.total_tokens += total
        self.reported = True


def _int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return min(value, USAGE_MAX)
    return 0


class JsonUsageScanner:
    """Incremental scan of a JSON object: captures chosen top-level values, counts ``data`` items."""

    __slots__ = ("_capture", "_depth", "_escape", "_expect_key", "_in_string",
                 "_key", "_key_parts", "_value_key", "broken", "captured", "data_items", "wanted")

    def __init__(self, wanted: tuple[str, ...] = ("usage",)) -> None:
        self.wanted = {w.encode(): w for w in wanted}
        self.captured: dict[str, bytes] = {}
        self.data_items = 0
        self.broken = False
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._expect_key = False
        self._key_parts: list[bytes] | None = None  # collecting a top-level key
        self._key = b""
        self._value_key: bytes | None = None  # top-level key whose value is being read
        self._capture: list[bytes] | None = None

    def feed(self, chunk: bytes) -> None:
        if self.broken:
            return
        i, end = 0, len(chunk)
        cap_start = 0 if self._capture is not None else -1
        while i < end:
            if self._in_string:
                if self._escape:
                    self._escape = False
                    i += 1
                    continue
                # memchr-speed jumps over megabytes of base64 (no quotes, no backslashes in it)
                quote = chunk.find(b'"', i)
                if self._key_parts is None:
                    # A value's string: one pass when no backslash is next to where it stops. The first
                    # quote not preceded by one ends it (earlier backslashes escaped other characters), and
                    # a chunk that does not end with one leaves no escape pending.
                    if quote == i or (quote > i and chunk[quote - 1] != 0x5C):
                        self._in_string = False
                        i = quote + 1
                        continue
                    if quote < 0 and chunk[end - 1] != 0x5C:
                        break
                stop = end if quote < 0 else quote
                j = chunk.find(b"\\", i, stop)
                if j < 0:
                    j = quote
                if j < 0:
                    if self._key_parts is not None:
                        self._key_parts.append(chunk[i:])
                    break
                if chunk[j] == 0x5C:  # backslash: skip the escaped char (maybe in the next chunk)
                    if self._key_parts is not None:
                        self._key_parts.append(chunk[i:j + 2])
                    if j + 1 < end:
                        i = j + 2
                    else:
                        self._escape = True
                        i = end
                    continue
                if self._key_parts is not None:
                    self._key_parts.append(chunk[i:j])
                    self._key = b"".join(self._key_parts)
                    self._key_parts = None
                self._in_string = False
                i = j + 1
                continue
            m = _STRUCT.search(chunk, i)
            if m is None:
                break
            j = m.start()
            c = chunk[j]
            i = j + 1
            if c == 0x22:  # "
                self._in_string = True
                if self._depth == 1 and self._expect_key:
                    self._key_parts = []
                    self._expect_key = False
            elif c == 0x3A:  # :
                if self._depth == 1:
                    self._value_key = self._key
                    if self._key in self.wanted:
                        self._capture, cap_start = [], j + 1
            elif c in (0x7B, 0x5B):  # { [
                if self._depth == 0 and c != 0x7B:
                    self.broken = True
                    return
                self._depth += 1
                if self._depth == 1:
                    self._expect_key = True
                elif self._depth == 3 and self._value_key == b"data":
                    self.data_items += 1
            elif c in (0x7D, 0x5D):  # } ]
                self._depth -= 1
                if self._depth == 0:
                    self._finish_capture(chunk, cap_start, j)
                    cap_start = -1
            elif c == 0x2C and self._depth == 1:  # ,
                self._finish_capture(chunk, cap_start, j)
                cap_start = -1
                self._expect_key = True
                self._value_key = None
        if self._capture is not None and cap_start >= 0:
            self._capture.append(chunk[cap_start:])

    def _finish_capture(self, chunk: bytes, start: int, stop: int) -> None:
        if self._capture is None:
            return
        if start >= 0:
            self._capture.append(chunk[start:stop])
        assert self._value_key is not None
        self.captured[self.wanted[self._value_key]] = b"".join(self._capture).strip()
        self._capture = None

    def value(self, name: str) -> Any:
        """A captured top-level value, parsed; None if absent or not JSON."""
        raw = self.captured.get(name)
        if not raw:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None


class SseUsageParser:
    """Splits an SSE byte stream into events; sums usage of completed-image events."""

    __slots__ = ("_buf", "completed", "error", "events", "usage")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.usage = Usage()
        self.completed = 0
        self.events = 0
        self.error: Any = None  # the data of an upstream `event: error`

    def feed(self, chunk: bytes) -> None:
        start = max(len(self._buf) - 3, 0)
        self._buf += chunk
        while True:
            cut, sep = _event_boundary(self._buf, start)
            if cut < 0:
                return
            start = 0
            if _skippable(self._buf):  # a partial image: megabytes nobody needs to copy or parse
                self.events += 1
                del self._buf[:cut + sep]
                continue
            event = bytes(self._buf[:cut])
            del self._buf[:cut + sep]
            self._event(event)

    @property
    def at_boundary(self) -> bool:
        """Everything fed so far ends on an event boundary (no partial event pending)."""
        return not self._buf.strip()

    def close(self, *, clean: bool = True) -> None:
        """End of stream: a trailing event without its blank line counts only if the stream ended
        cleanly and its data is whole JSON; a truncated event is never billed as a completed image."""
        tail = bytes(self._buf)
        self._buf.clear()
        if tail.strip() and clean and _loads(_parse_event(tail)[1]) is not None:
            self._event(tail)

    def _event(self, raw: bytes) -> None:
        name, payload = _parse_event(raw)
        if name is None:
            return
        self.events += 1
        if name == b"error":
            self.error = _loads(payload)
            return
        if name and name not in _COMPLETED_NAMES:
            return
        scanner = JsonUsage(("type", "usage"))
        scanner.feed(payload)
        kind = scanner.value("type")
        if not isinstance(kind, str):  # an object or array is no known type (and is unhashable)
            kind = None
        if kind == "error":
            self.error = _loads(payload)
        elif kind in COMPLETED_EVENTS or (name and kind is None):
            self.completed += 1
            self.usage.images += 1
            self.usage.add_openai(scanner.value("usage"))


def _parse_event(raw: bytes) -> tuple[bytes | None, bytes]:
    """An event's name and data; name None when it has neither (a comment, a blank)."""
    name = b""
    data: list[bytes] = []
    for line in raw.splitlines():  # an SSE line ends with CRLF, LF or a lone CR
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            name = line[6:].strip()
    if not data and not name:
        return None, b""
    return name, b"\n".join(data)


def _skippable(buf: bytearray) -> bool:
    """The event at the start of ``buf`` names itself (``event:`` first) as neither completed nor error."""
    if not buf.startswith(b"event:"):
        return False
    ends = [k for k in (buf.find(b"\n", 0, 256), buf.find(b"\r", 0, 256)) if k >= 0]
    if not ends:
        return False
    line_end = min(ends)
    name = bytes(buf[6:line_end]).strip()
    return name not in _COMPLETED_NAMES and name != b"error"


def _event_boundary(buf: bytearray, start: int) -> tuple[int, int]:
    """Index and length of the first blank-line separator at or after ``start``."""
    best, size = -1, 0
    for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        k = buf.find(sep, start)
        if k >= 0 and (best < 0 or k < best):
            best, size = k, len(sep)
    return best, size


def _loads(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


SMALL_JSON = 64 * 1024


class JsonUsage:
    """``JsonUsageScanner``'s readings; a body of at most ``SMALL_JSON`` bytes is parsed whole at its end.

    A body that is not a JSON object (or that orjson refuses) is scanned after all, so the readings
    are the scanner's whatever the bytes; past ``SMALL_JSON`` the scanner reads it as it arrives.
    """

    __slots__ = ("_doc", "_held", "_held_size", "_scanner", "wanted")

    def __init__(self, wanted: tuple[str, ...] = ("usage",)) -> None:
        self.wanted = frozenset(wanted)
        self._held: list[bytes] | None = []
        self._held_size = 0
        self._doc: dict[str, Any] | None = None
        self._scanner: JsonUsageScanner | None = None

    def feed(self, chunk: bytes) -> None:
        held = self._held
        if held is None:
            assert self._scanner is not None, "fed after its readings were taken"
            self._scanner.feed(chunk)
            return
        held.append(chunk)
        self._held_size += len(chunk)
        if self._held_size > SMALL_JSON:
            self._scan_held()

    def _scan_held(self) -> None:
        held, self._held = self._held or [], None
        self._scanner = JsonUsageScanner(tuple(self.wanted))
        for chunk in held:
            self._scanner.feed(chunk)

    def _settle(self) -> None:
        """At the end of the body: parse what is held, or scan it if it is not a JSON object."""
        if self._held is None:
            return
        try:
            doc = orjson.loads(b"".join(self._held))
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            self._held, self._doc = None, doc
        else:
            self._scan_held()

    @property
    def data_items(self) -> int:
        """Entries of the top-level ``data`` that are objects or arrays (an images answer's images)."""
        self._settle()
        if self._doc is None:
            return self._scanner.data_items if self._scanner is not None else 0
        data = self._doc.get("data")
        items = data.values() if isinstance(data, dict) else data if isinstance(data, list) else ()
        return sum(1 for item in items if isinstance(item, dict | list))

    def value(self, name: str) -> Any:
        """A wanted top-level value, parsed; None if absent or not JSON."""
        self._settle()
        if self._doc is None:
            return self._scanner.value(name) if self._scanner is not None else None
        return self._doc.get(name) if name in self.wanted else None


def usage_from_json(scanner: JsonUsageScanner | JsonUsage) -> Usage:
    """The usage of a finished non-stream images response."""
    usage = Usage(images=scanner.data_items)
    usage.add_openai(scanner.value("usage"))
    return usage
