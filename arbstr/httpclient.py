"""A small HTTP/1.1 client for the addon's calls to providers: keep-alive pools, timeouts, streams.

Why not httpx: profiling `arbstr serve` under load put ~45% of its CPU in httpx, ~30% in
httpcore's pool alone (it checks every idle connection with system calls on every request).
Providers speak plain HTTP/1.1 JSON and SSE; this client does only that: one write per request,
a head parsed once, bodies framed by Content-Length, chunked encoding or the connection's end.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024
READ_SIZE = 64 * 1024


class HttpError(Exception):
    """Any failure talking to a provider; the cause chain keeps the OS error."""


class ConnectError(HttpError):
    """No connection: refused, DNS, TLS, unreachable, out of descriptors."""


class ConnectTimeout(ConnectError):
    pass


class ProtocolError(HttpError):
    """The provider's answer was not well-formed HTTP/1.1, or the connection broke."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def netloc(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@functools.lru_cache(maxsize=4096)
def split_url(url: str) -> tuple[Origin, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Origin(parts.scheme, parts.hostname, port), target


class _Connection:
    __slots__ = ("reader", "writer", "idle_since", "reused")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = 0.0
        self.reused = False

    def usable(self, now: float, idle_timeout: float) -> bool:
        return not (self.writer.is_closing() or self.reader.at_eof() or now - self.idle_since > idle_timeout)

    def close(self) -> None:
        self.writer.close()


class Response:
    """A response whose head has arrived; read its body once, with `read()` or `iter_raw()`."""

    def __init__(self, client: HttpClient, origin: Origin, connection: _Connection, status: int, reason: str,
                 headers: list[tuple[bytes, bytes]], keep_alive: bool, no_body: bool) -> None:
        """`headers` keep the provider's spelling; lookups ignore case."""
        self.status, self.reason, self.headers = status, reason, headers
        self._client, self._origin, self._connection = client, origin, connection
        self._keep_alive = keep_alive
        self._done = no_body
        self._length: int | None = None
        self._chunked = False
        for name, value in headers:
            name = name.lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
            elif name == b"content-length" and self._length is None:
                try:
                    self._length = int(value)
                except ValueError:
                    raise ProtocolError(f"bad Content-Length: {value!r}") from None
        if not self._chunked and self._length is None:
            self._keep_alive = False  # the body ends when the connection does
        if self._length == 0 and not self._chunked:
            self._done = True

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == wanted), None)

    async def read(self) -> bytes:
        """The whole body (transfer encoding removed, content encoding kept)."""
        return b"".join([chunk async for chunk in self.iter_raw()])

    async def iter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives, transfer encoding removed, content encoding kept."""
        reader = self._connection.reader
        try:
            if self._done:
                return
            if self._chunked:
                while True:
                    size_line = await reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";", 1)[0].strip() or b"x", 16)
                    if size == 0:
                        while (await reader.readuntil(b"\r\n")) != b"\r\n":
                            pass  # trailers
                        break
                    data = await reader.readexactly(size)
                    if await reader.readexactly(2) != b"\r\n":
                        raise ProtocolError("a chunk did not end with CRLF")
                    yield data
            elif self._length is not None:
                remaining = self._length
                while remaining:
                    data = await reader.read(min(remaining, READ_SIZE))
                    if not data:
                        raise ProtocolError(f"the connection closed {remaining} bytes before the body's end")
                    remaining -= len(data)
                    yield data
            else:
                while data := await reader.read(READ_SIZE):
                    yield data
            self._done = True
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError) as exc:
            self._keep_alive = False
            raise ProtocolError(f"the body broke off: {exc or type(exc).__name__}") from exc
        finally:
            if self._done:
                await self.aclose()

    async def aclose(self) -> None:
        """Give the connection back for reuse when the body was read to its end, else close it."""
        connection = self._connection
        if connection is None:
            return
        self._connection = None
        if self._done and self._keep_alive:
            self._client._release(self._origin, connection)
        else:
            connection.close()


class HttpClient:
    """Pooled HTTP/1.1 connections per origin (no limit on their number: streams may be many)."""

    def __init__(self, connect_timeout: float, idle_timeout: float = 30.0, max_idle_per_origin: int = 256,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle_per_origin = max_idle_per_origin
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._closed = False

    async def request(self, method: str, url: str, headers: Sequence[tuple[str, str]], body: bytes = b"") -> Response:
        """Send a request and return once the response head is in. Cancelling closes the connection."""
        origin, target = split_url(url)
        head = [f"{method} {target} HTTP/1.1\r\nhost: {origin.netloc}\r\n"]
        head += [f"{name}: {value}\r\n" for name, value in headers]
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(f"content-length: {len(body)}\r\n")
        raw = "".join(head).encode("latin-1") + b"\r\n" + body
        connection = await self._acquire(origin)
        try:
            try:
                return await self._exchange(origin, connection, raw, method)
            except _StaleConnection:
                connection.close()
                connection = await self._connect(origin)
                return await self._exchange(origin, connection, raw, method)
        except BaseException:
            connection.close()
            raise

    async def _exchange(self, origin: Origin, connection: _Connection, raw: bytes, method: str) -> Response:
        reader, writer = connection.reader, connection.writer
        try:
            writer.write(raw)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            while head[9:10] == b"1" and head[:5] == b"HTTP/":  # 1xx: an interim answer, then the real one
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if connection.reused and not exc.partial:
                raise _StaleConnection from exc  # the provider had closed the idle connection
            raise ProtocolError("the connection closed before a response") from exc
        except ConnectionError as exc:
            if connection.reused:
                raise _StaleConnection from exc
            raise ProtocolError(f"the connection broke: {exc}") from exc
        except asyncio.LimitOverrunError as exc:
            raise ProtocolError("the response head is too large") from exc
        status, reason, headers, keep_alive = _parse_head(head)
        no_body = method == "HEAD" or status in (204, 304)
        return Response(self, origin, connection, status, reason, headers, keep_alive, no_body)

    async def _acquire(self, origin: Origin) -> _Connection:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.usable(now, self.idle_timeout):
                connection.reused = True
                return connection
            connection.close()
        return await self._connect(origin)

    async def _connect(self, origin: Origin) -> _Connection:
        tls = origin.scheme == "https"
        if tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(origin.host, origin.port, ssl=self._ssl if tls else None,
                                        server_hostname=origin.host if tls else None, limit=MAX_HEAD_BYTES),
                self.connect_timeout)
        except TimeoutError as exc:
            raise ConnectTimeout(f"no connection to {origin.netloc} within {self.connect_timeout:g} s") from exc
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(str(exc) or type(exc).__name__) from exc
        return _Connection(reader, writer)

    def _release(self, origin: Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if self._closed or len(idle) >= self.max_idle_per_origin:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


class _StaleConnection(Exception):
    """A reused connection the provider had already closed: safe to send again on a fresh one."""


def _parse_head(head: bytes) -> tuple[int, str, list[tuple[bytes, bytes]], bool]:
    lines = head[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or not code.isdigit() or len(code) != 3:
        raise ProtocolError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise ProtocolError(f"a malformed header line: {line[:80]!r}")
        headers.append((name, value.strip()))
    connection = b",".join(v for k, v in headers if k.lower() == b"connection").lower()
    keep_alive = b"close" not in connection if version == b"HTTP/1.1" else b"keep-alive" in connection
    return int(code), reason.decode("latin-1"), headers, keep_alive
