"""The one HTTP/1.1 codec: every message arbstr reads or writes on a socket goes through here.

Heads are parsed by mitmproxy's own HTTP/1 helpers (`mitmproxy.net.http.http1`) and bodies are
framed by h11's readers, the pair mitmproxy's HTTP/1 layer itself is built on, so arbstr parses
what mitmproxy parses, the way it parses it. A provider's response head, read for every request,
is parsed by mitmproxy's line readers and framed by its rules without the `Response` object its
`read_response_head` builds around them (see `response_framing`). The provider client, the stream relay, the mock
provider and the benchmark's load generator all use this module; nothing else frames HTTP.

h11's readers and receive buffer are private to h11 (mitmproxy pins h11 exactly and imports them
the same way); this is the one module that touches them, and it checks the version it was written for.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass

import h11
from h11._readers import ChunkedReader, ContentLengthReader, Http10Reader
from h11._receivebuffer import ReceiveBuffer
from mitmproxy.net.http import status_codes, validate
from mitmproxy.net.http.http1 import connection_close, expected_http_body_size, read_request_head
from mitmproxy.net.http.http1.read import _read_headers, _read_response_line

from arbstr.errors import ArbstrError

if not h11.__version__.startswith("0.16."):  # pragma: no cover - caught by the test suite on an upgrade
    raise ImportError(f"arbstr.http1 was written against h11 0.16 (mitmproxy 12 pins it); found {h11.__version__}")

READ_SIZE = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024
"""A head (start line and headers) larger than this is refused."""

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[^\x00\r\n]*")


class Http1Error(Exception):
    """The peer sent something that is not well-formed HTTP/1.x, or broke off mid-message."""


class ClosedBeforeHead(Http1Error):
    """The connection ended before a complete head arrived; `received` says whether any byte did."""

    def __init__(self, received: bool) -> None:
        super().__init__("the connection closed before a response" if not received
                         else "the connection closed in the middle of a head")
        self.received = received


class HeadTooLarge(Http1Error):
    pass


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]
    """As the peer spelled them, in order, repeats kept."""
    keep_alive: bool
    body_size: int | None
    """Content-Length; None for chunked; -1 for "until the connection closes"; 0 for no body."""


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    path: str
    """Origin form (`/v1/chat/completions?x=1`), also when the client sent the absolute form."""
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    body_size: int
    """Content-Length, 0 without one; -2 for chunked (its size is known only at its end)."""
    http11: bool
    """HTTP/1.1 (False: HTTP/1.0, which knows no chunked encoding)."""

    def header(self, name: bytes) -> bytes | None:
        return header_value(self.headers, name)


CHUNKED = -2
_VERSIONS = frozenset({"HTTP/1.0", "HTTP/1.1"})
_VERSION_BYTES = frozenset(version.encode() for version in _VERSIONS)
_FRAMING_HEADERS = frozenset({b"transfer-encoding", b"content-length", b"connection"})


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of a header, case-insensitively."""
    name = name.lower()
    return next((v for k, v in headers if k.lower() == name), None)


class MessageReader:
    """Reads HTTP/1 messages, one after another, from an asyncio stream: a head, then its body."""

    __slots__ = ("_stream", "_buf", "_body", "_unread", "received_any")

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self._stream = stream
        self._buf = ReceiveBuffer()
        self._body: ContentLengthReader | ChunkedReader | Http10Reader | None = None
        self._unread: int | None = None
        """The current body's Content-Length while none of it has been read; else None."""
        self.received_any = False
        """Whether any byte of the current message's head has arrived."""

    @property
    def idle(self) -> bool:
        """No unread byte is buffered: nothing arrived that no request asked for."""
        return not self._buf

    async def _head_lines(self) -> list[bytes]:
        self.received_any = bool(self._buf)
        while (lines := self._take_lines()) is None:
            await self._read_more()
        return lines

    def _take_lines(self) -> list[bytes] | None:
        """The next head's lines, taken out of the buffer; None until the buffer holds all of it."""
        lines = self._buf.maybe_extract_lines()
        if lines is not None:
            if sum(map(len, lines)) > MAX_HEAD_BYTES:
                raise HeadTooLarge(f"a head larger than {MAX_HEAD_BYTES} bytes")
            return [bytes(line) for line in lines]
        if len(self._buf) > MAX_HEAD_BYTES:
            raise HeadTooLarge(f"a head larger than {MAX_HEAD_BYTES} bytes")
        return None

    async def _read_more(self) -> None:
        data = await self._stream.read(READ_SIZE)
        if not data:
            raise ClosedBeforeHead(self.received_any)
        self.received_any = True
        self._buf += data

    async def _head_fields(self) -> tuple[bytes, tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]]]:
        """The next head's start line and header fields, as h11's lines and mitmproxy's
        `_read_headers` give them (ValueError for a malformed header line)."""
        self.received_any = bool(self._buf)
        while True:
            if (plain := _plain_head(self._buf)) is not None:
                return plain
            if (lines := self._take_lines()) is not None:
                return lines[0], _read_headers(lines[1:]).fields
            await self._read_more()

    async def response_head(self, method: str = "POST") -> ResponseHead:
        """The next final response head (1xx interim answers are skipped); then read its body."""
        while True:
            try:
                start, headers = await self._head_fields()
                version, status, reason = _read_response_line(start)
                if version not in _VERSION_BYTES:
                    raise Http1Error(f"unsupported HTTP version {version.decode('ascii', 'replace')!r}")
                if 100 <= status < 200 and status != 101:
                    continue
                size, keep_alive = response_framing(method, status, version, headers)
            except ValueError as exc:
                raise Http1Error(str(exc)) from None
            break
        self._start_body(size)
        return ResponseHead(status, reason.decode("iso-8859-1"), list(headers), keep_alive, size)

    async def request_head(self) -> RequestHead:
        """The next request head; ClosedBeforeHead(received=False) when the peer closed between requests."""
        lines = await self._head_lines()
        try:
            request = read_request_head(lines)
            size = expected_http_body_size(request)
        except ValueError as exc:
            raise Http1Error(str(exc)) from None
        if request.http_version not in _VERSIONS:
            raise Http1Error(f"unsupported HTTP version {request.http_version!r}")
        self._start_body(size)
        return RequestHead(request.method, request.path, list(request.headers.fields),
                           not connection_close(request.http_version, request.headers),
                           CHUNKED if size is None else size, request.http_version == "HTTP/1.1")

    def _start_body(self, size: int | None) -> None:
        self._unread = size if size is not None and size >= 0 else None
        if size is None:
            self._body = ChunkedReader()
        elif size == -1:
            self._body = Http10Reader()
        else:
            self._body = ContentLengthReader(size)

    def buffered_body(self, limit: int) -> bytes | None:
        """The whole current body when its Content-Length says all of it is in the buffer already
        (none of it read yet, and at most `limit` bytes): what `body` would return, taken at once,
        without a reader step per piece. None otherwise, nothing taken."""
        size = self._unread
        if size is None or size > limit or len(self._buf) < size:
            return None
        self._unread = self._body = None
        return bytes(self._buf.maybe_extract_at_most(size) or b"")

    async def body_data(self) -> bytes | None:
        """The next piece of the current body (transfer coding removed), or None at its end."""
        self._unread = None
        body = self._body
        if body is None:
            return None
        try:
            while True:
                event = body(self._buf)
                if event is None:
                    data = await self._stream.read(READ_SIZE)
                    if data:
                        self._buf += data
                        continue
                    event = body.read_eof()
                if type(event) is h11.Data:
                    if event.data:
                        return bytes(event.data)
                    continue
                self._body = None
                return None
        except h11.ProtocolError as exc:
            self._body = None
            raise Http1Error(str(exc)) from None

    async def body(self, limit: int | None = None) -> bytes:
        """The whole current body; Http1Error past `limit` bytes."""
        parts, size = [], 0
        while (data := await self.body_data()) is not None:
            size += len(data)
            if limit is not None and size > limit:
                raise BodyTooLarge(f"a body larger than {limit} bytes")
            parts.append(data)
        return b"".join(parts)


class BodyTooLarge(Http1Error):
    pass


def _plain_head(buffer: ReceiveBuffer) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    """A whole head in the buffer with CRLF line ends only and plain `name: value` header lines
    (what providers send), taken out and split exactly as h11's `maybe_extract_lines` and
    mitmproxy's `_read_headers` split it, in one pass instead of their two; None, the buffer
    untouched, for anything else (bare LFs, folded or malformed lines, an empty first line, a head
    not complete yet or over MAX_HEAD_BYTES), which they read."""
    data = buffer._data  # noqa: SLF001 - a read of h11's buffer, which has no public peek
    end = data.find(b"\r\n\r\n")
    if end <= 0 or end > MAX_HEAD_BYTES or data[:2] == b"\r\n" \
            or data.count(b"\n", 0, end) != data.count(b"\r\n", 0, end):
        return None
    start, *lines = bytes(data[:end]).split(b"\r\n")
    fields = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not name or not colon or line[0] in b" \t":
            return None
        fields.append((name, value.strip()))
    buffer.maybe_extract_at_most(end + 4)
    return start, fields


def response_framing(method: str, status: int, version: bytes,
                     headers: Iterable[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """(body size as `expected_http_body_size` gives it, keep-alive as `connection_close` decides
    it) of a response head: mitmproxy's rules and value parsers, over one pass of the headers
    instead of a `Headers` lookup (each a walk over every field) per rule. Repeated headers are
    folded with ", " as `Headers` folds them. ValueError for a malformed Content-Length or
    Transfer-Encoding, as mitmproxy raises it."""
    found: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered in _FRAMING_HEADERS:
            found.setdefault(lowered, []).append(value)
    connection = found.get(b"connection")
    tokens = [token.strip() for token in b", ".join(connection).split(b",")] if connection else ()
    keep_alive = (False if b"close" in tokens else True if b"keep-alive" in tokens
                  else version == b"HTTP/1.1")
    if method.upper() == "HEAD" or 100 <= status <= 199 or status in (204, 304) \
            or 200 <= status <= 299 and method.upper() == "CONNECT":
        return 0, keep_alive
    if (te := b", ".join(found.get(b"transfer-encoding", ()))):
        # Chunked last: the chunks frame it; any other coding (valid only in a response): until close.
        return (None if validate.parse_transfer_encoding(te).endswith("chunked") else -1), keep_alive
    if (length := b", ".join(found.get(b"content-length", ()))):
        return validate.parse_content_length(length), keep_alive
    return -1, keep_alive


def line_feeds(buffer: ReceiveBuffer) -> int | None:
    """How many line feeds a receive buffer holds; None when it starts with an empty line (which
    h11's `maybe_extract_lines` hands back on its own, as an empty list)."""
    data = buffer._data  # noqa: SLF001 - a read of h11's buffer, which has no public peek
    if data[:1] == b"\n" or data[:2] == b"\r\n":
        return None
    return data.count(b"\n")


def valid_field(name: bytes, value: bytes) -> bool:
    """Whether a header can be written as it is: a token name and a value without CR, LF or NUL."""
    return _TOKEN.fullmatch(name) is not None and _FIELD_VALUE.fullmatch(value) is not None


def request_bytes(method: bytes, target: bytes, host: bytes, headers: Iterable[tuple[bytes, bytes]],
                  body: bytes) -> bytes:
    """A whole request with a Content-Length body. Headers must already be valid (see `valid_field`)."""
    lines = [b"%s %s HTTP/1.1\r\nhost: %s" % (method, target, host)]
    lines += [name + b": " + value for name, value in headers]
    if body or method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def response_head_bytes(status: int, reason: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def closing_error(error: ArbstrError) -> bytes:
    """A whole OpenAI-shaped error answer, after which the connection closes."""
    body = error.to_json()
    reason = status_codes.RESPONSES.get(error.status, "Error").encode()
    return response_head_bytes(error.status, reason, [(b"content-type", b"application/json"),
                                                      (b"content-length", b"%d" % len(body)),
                                                      (b"connection", b"close")]) + body


def chunk(data: bytes) -> bytes:
    """One piece of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
