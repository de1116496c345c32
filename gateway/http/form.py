"""Reading a multipart/form-data body: streamed through python-multipart, files spooled, bounded.

The body is parsed as it arrives, never held whole: text fields are kept (each at most
``TEXT_FIELD_MAX_BYTES``), files go to ``SpooledTemporaryFile`` (memory up to
``SPOOL_MEMORY_BYTES``, then an unnamed temporary file). The size limit is checked against
the bytes received, so a chunked body without Content-Length is bounded too.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from gateway.errors import InvalidRequest, RequestTooLarge
from gateway.http.body import client_gone
from gateway.upstream.form_body import FilePart

SPOOL_MEMORY_BYTES = 1 << 20  # a file beyond this is spooled to temporary disk
TEXT_FIELD_MAX_BYTES = 1 << 20  # a prompt is at most 32000 characters: a bigger text field is a mistake
# 16 images, a mask and a score of fields fit many times over; the cap keeps a body of a million
# empty parts from costing a million Python objects.
MAX_PARTS = 100


@dataclass(slots=True)
class Form:
    """A parsed form: text fields in the order sent, and the files."""

    fields: list[tuple[str, str]] = field(default_factory=list)
    files: list[FilePart] = field(default_factory=list)

    def close(self) -> None:
        for part in self.files:
            part.file.close()


class _Collector:
    """python-multipart callbacks that build a ``Form``."""

    def __init__(self, form: Form) -> None:
        self.form = form
        self.ended = False
        self.parts = 0
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._name = ""
        self._text: bytearray | None = None
        self._file: FilePart | None = None

    def callbacks(self) -> dict[str, object]:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
                "on_part_end": self.part_end, "on_end": self.end}

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise InvalidRequest(f"A form may have at most {MAX_PARTS} fields and files.")
        self._headers = {}
        self._header_name = self._header_value = b""

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name")
        if disposition != b"form-data" or name is None:
            raise InvalidRequest("Every part of a multipart/form-data body needs "
                                 "'Content-Disposition: form-data; name=...'.")
        self._name = _text(name)
        filename = options.get(b"filename")
        if filename is None:
            self._text = bytearray()
            return
        content_type = self._headers.get(b"content-type", b"application/octet-stream").decode("latin-1").strip()
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)
        self._file = FilePart(self._name, _text(filename), content_type, spool, 0)
        self.form.files.append(self._file)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.file.write(data[start:end])
            self._file.size += end - start
        elif self._text is not None:
            self._text += data[start:end]
            if len(self._text) > TEXT_FIELD_MAX_BYTES:
                raise InvalidRequest(f"The field '{self._name}' is longer than {TEXT_FIELD_MAX_BYTES} bytes.",
                                     param=self._name)

    def part_end(self) -> None:
        if self._text is not None:
            try:
                self.form.fields.append((self._name, self._text.decode()))
            except UnicodeDecodeError:
                raise InvalidRequest(f"The field '{self._name}' is not UTF-8 text.", param=self._name) from None
        self._text, self._file = None, None

    def end(self) -> None:
        self.ended = True


def _text(raw: bytes) -> str:
    # python-multipart hands header parameters back as latin-1 bytes of what was sent, usually UTF-8.
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


async def read_form(request: Request, limit: int) -> Form:
    """The request's form, refused with 400 if it is not one and 413 past ``limit`` bytes."""
    content_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidRequest("The request body must be multipart/form-data (with a boundary) for image edits.")
    declared = request.headers.get("content-length")
    too_large = f"Request body is larger than the limit of {limit} bytes."
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(too_large)
    form = Form()
    collector = _Collector(form)
    size = 0
    try:
        parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(too_large)
            parser.write(chunk)
        parser.finalize()
        if not collector.ended:
            raise InvalidRequest("The multipart/form-data body ended before its closing boundary.")
    except ClientDisconnect:
        form.close()
        raise client_gone(request, size) from None
    except (MultipartParseError, ValueError) as exc:
        form.close()
        raise InvalidRequest("We could not parse the multipart/form-data body of your request.") from exc
    except BaseException:
        form.close()
        raise
    return form
