"""A multipart/form-data body for the upstream, streamed from spooled files.

The files of an edit are forwarded byte for byte with their field names (``image`` or
``image[]`` as the client sent them), filenames and content types. The body is never
assembled in memory: each send streams the text fields, then each spooled file in 64 KiB
reads, with its exact length declared up front (no chunked encoding). A send can be
repeated (the next upstream key after a 401) because each ``payload()`` starts afresh.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import IO

from aiohttp.payload import AsyncIterablePayload

READ_SIZE = 1 << 16


@dataclass(slots=True)
class FilePart:
    """One uploaded file: its field name, filename, declared content type and spooled bytes."""

    field: str
    filename: str
    content_type: str
    file: IO[bytes]
    size: int

    def head(self, count: int) -> bytes:
        """The first ``count`` bytes (or fewer), for sniffing the format and dimensions."""
        self.file.seek(0)
        return self.file.read(count)


def _quote(value: str) -> bytes:
    # As browsers encode form names and filenames: the three characters that would end the header.
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A").encode()


class FormBody:
    """Text fields and files as one multipart body of known size."""

    def __init__(self, fields: Iterable[tuple[str, str]], files: list[FilePart]) -> None:
        self.fields = list(fields)
        self.boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        dash = b"--" + self.boundary.encode()
        head = bytearray()
        for name, value in self.fields:
            head += dash + b'\r\nContent-Disposition: form-data; name="' + _quote(name) + b'"\r\n\r\n'
            head += value.encode() + b"\r\n"
        self._head = bytes(head)
        self._file_heads = [
            dash + b'\r\nContent-Disposition: form-data; name="' + _quote(f.field) + b'"; filename="'
            + _quote(f.filename) + b'"\r\nContent-Type: ' + f.content_type.encode("latin-1", "replace")
            + b"\r\n\r\n" for f in files]
        self._tail = dash + b"--\r\n"
        self.files = files
        self.size = len(self._head) + len(self._tail) + sum(
            len(h) + f.size + 2 for h, f in zip(self._file_heads, files, strict=True))

    async def _chunks(self) -> AsyncIterator[bytes]:
        yield self._head
        for file_head, part in zip(self._file_heads, self.files, strict=True):
            yield file_head
            part.file.seek(0)
            while chunk := part.file.read(READ_SIZE):
                yield chunk
            yield b"\r\n"
        yield self._tail

    def payload(self) -> AsyncIterablePayload:
        """A fresh, single-use payload streaming the whole body."""
        return AsyncIterablePayload(self._chunks(), content_type=self.content_type)

    def close(self) -> None:
        """Free the spooled files (memory or temporary disk)."""
        for part in self.files:
            with contextlib.suppress(OSError):
                part.file.close()
