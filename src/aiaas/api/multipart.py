"""A multipart/form-data reader that hands a file part over chunk by chunk, as it arrives.

Starlette's own form parser spools file parts to a temporary file, which would put uploaded
plaintext on disk before it is encrypted. This reader pulls the request body on demand, so the
file's bytes go from the socket to the encrypting blob store with backpressure and nothing else
in between:

    form = StreamingForm(request)
    part = await form.next_file()      # fields before the file land in form.fields
    ...  form.sync_chunks()            # in a worker thread: the part's bytes, pulled from the loop
    await form.finish()                # fields after the file; a second file is a 400
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import anyio.from_thread
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from aiaas.errors import InvalidRequest, UnsupportedMediaType

__all__ = ["FilePart", "StreamingForm"]


@dataclass(frozen=True, slots=True)
class FilePart:
    name: str
    filename: str
    content_type: str | None


class StreamingForm:
    def __init__(
        self, request: Request, *, max_fields: int = 16, max_field_bytes: int = 64 * 1024
    ) -> None:
        media_type, options = parse_options_header(request.headers.get("content-type", ""))
        if media_type != b"multipart/form-data":
            raise UnsupportedMediaType(
                "Uploads must be multipart/form-data with a 'file' part.", param="Content-Type"
            )
        boundary = options.get(b"boundary")
        if not boundary:
            raise InvalidRequest("The multipart body has no boundary.", param="Content-Type")
        self.fields: dict[str, str] = {}
        self._max_fields = max_fields
        self._max_field_bytes = max_field_bytes
        self._body: AsyncIterator[bytes] = request.stream().__aiter__()
        self._events: deque[FilePart | bytes | None] = deque()  # None ends a file part
        self._ended = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_name = b""
        self._header_value = b""
        self._field: tuple[str, bytearray] | None = None
        self._in_file = False
        try:
            self._parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._on_part_begin,
                    "on_header_field": self._on_header_field,
                    "on_header_value": self._on_header_value,
                    "on_header_end": self._on_header_end,
                    "on_headers_finished": self._on_headers_finished,
                    "on_part_data": self._on_part_data,
                    "on_part_end": self._on_part_end,
                },
            )
        except (FormParserError, ValueError) as exc:
            raise InvalidRequest(
                f"Invalid multipart boundary: {exc}", param="Content-Type"
            ) from exc

    async def next_file(self) -> FilePart | None:
        """Read on to the next file part's headers; None when the body ends first."""
        while True:
            while self._events:
                event = self._events.popleft()
                if isinstance(event, FilePart):
                    return event
            if self._ended:
                return None
            await self._pump()

    async def read(self) -> bytes | None:
        """The current file part's next bytes; None at the end of the part."""
        while not self._events:
            if self._ended:
                raise InvalidRequest("The multipart body ended inside a file.", param="file")
            await self._pump()
        data = bytearray()
        while self._events and isinstance(self._events[0], bytes):
            data += self._events.popleft()  # type: ignore[operator]
        if data:
            return bytes(data)
        self._events.popleft()  # the part's end
        return None

    def sync_chunks(self) -> Iterator[bytes]:
        """`read()` for a worker thread started by anyio: each chunk is pulled on the loop."""
        while (chunk := anyio.from_thread.run(self.read)) is not None:
            yield chunk

    async def finish(self) -> None:
        """Read the rest of the body; only form fields may follow the file."""
        if await self.next_file() is not None:
            raise InvalidRequest("Upload one file per request.", param="file")

    async def _pump(self) -> None:
        try:
            chunk = await self._body.__anext__()
        except StopAsyncIteration:
            chunk = None
        try:
            if chunk is None:
                self._parser.finalize()
                self._ended = True
            elif chunk:
                self._parser.write(chunk)
        except FormParserError as exc:
            raise InvalidRequest(f"Malformed multipart body: {exc}", param="file") from exc
        if self._ended and self._in_file:
            raise InvalidRequest("The multipart body ended inside a file.", param="file")

    # -- parser callbacks (run inside parser.write, on the event loop) ---------------------------

    def _on_part_begin(self) -> None:
        self._headers = []

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers.append((self._header_name.lower(), self._header_value))
        self._header_name = self._header_value = b""

    def _on_headers_finished(self) -> None:
        headers = dict(self._headers)
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        name = _decode(options.get(b"name"))
        if not name:
            raise InvalidRequest("A multipart part has no name.", param="file")
        if b"filename" in options:
            content_type = headers.get(b"content-type")
            self._in_file = True
            self._events.append(
                FilePart(
                    name=name,
                    filename=_decode(options[b"filename"]),
                    content_type=_decode(content_type) if content_type else None,
                )
            )
        else:
            if len(self.fields) >= self._max_fields:
                raise InvalidRequest(f"More than {self._max_fields} form fields.", param=name)
            self._field = (name, bytearray())

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._events.append(data[start:end])
        elif self._field is not None:
            buffer = self._field[1]
            buffer += data[start:end]
            if len(buffer) > self._max_field_bytes:
                raise InvalidRequest(
                    f"Form field {self._field[0]!r} is longer than {self._max_field_bytes} bytes.",
                    param=self._field[0],
                )

    def _on_part_end(self) -> None:
        if self._in_file:
            self._in_file = False
            self._events.append(None)
        elif self._field is not None:
            name, buffer = self._field
            self.fields[name] = _decode(bytes(buffer))
            self._field = None


def _decode(value: bytes | None) -> str:
    if value is None:
        return ""
    try:
        return codecs.decode(value, "utf-8")
    except UnicodeDecodeError:
        return codecs.decode(value, "latin-1")
