"""A small HTTP/1.1 client for arbstr's calls to providers: keep-alive pools, connect deadline, streams.

Why not httpx: profiling `arbstr serve` under load put ~45% of its CPU in httpx, ~30% in
httpcore's pool alone (it checks every idle connection with system calls on every request).
Framing is `arbstr.http1`'s (mitmproxy's head parser, h11's body readers).

A request is never sent twice. A pooled connection is used only if, just before writing, the
provider has not closed it; once the request is written, a connection that breaks before the
answer is `NoResponse`: the provider may have read (and billed) it, so the caller fails over to
another provider instead of sending it again.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from arbstr import http1

IDLE_TIMEOUT = 4.0
"""Seconds a pooled connection may sit idle. Below uvicorn's 5 s keep-alive (what Routstr nodes
run), so arbstr drops an idle connection before the provider does, instead of racing its close."""


class HttpError(Exception):
    """Any failure talking to a provider; the cause chain keeps the OS error."""

    may_have_reached = False
    """Whether the provider may have read the request (and so may bill it)."""


class ConnectError(HttpError):
    """No connection: refused, DNS, TLS, unreachable, out of descriptors. The request was not sent."""


class ConnectTimeout(ConnectError):
    pass


class ProtocolError(HttpError):
    """The provider's answer was not well-formed HTTP/1.1, or the connection broke mid-answer."""

    may_have_reached = True


class NoResponse(ProtocolError):
    """The connection closed after the request was written and before any byte of an answer."""


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
    __slots__ = ("reader", "writer", "messages", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.messages = http1.MessageReader(reader)
        self.idle_since = 0.0

    def usable(self, now: float) -> bool:
        """Still open at our end and the provider's, nothing unasked-for waiting, not idle too long."""
        return not (self.writer.is_closing() or self.reader.at_eof() or self.reader.exception() is not None
                    or len(self.reader._buffer) or not self.messages.idle  # noqa: SLF001 - a peek, no read
                    or now - self.idle_since > IDLE_TIMEOUT)

    def close(self) -> None:
        self.writer.close()


class Response:
    """A response whose head has arrived; read its body once, with `read()` or `iter_raw()`."""

    def __init__(self, client: HttpClient, origin: Origin, connection: _Connection, head: http1.ResponseHead) -> None:
        self.status, self.reason, self.headers = head.status, head.reason, head.headers
        self._client, self._origin, self._connection = client, origin, connection
        self._keep_alive = head.keep_alive and head.body_size != -1
        self._done = head.body_size == 0

    def header(self, name: str) -> str | None:
        value = http1.header_value(self.headers, name.encode())
        return None if value is None else value.decode("latin-1")

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (transfer coding removed, content coding kept); ProtocolError past `limit` bytes."""
        parts, size = [], 0
        async for data in self.iter_raw():
            size += len(data)
            if limit is not None and size > limit:
                raise BodyTooLarge(f"the body is larger than {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    async def iter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives, transfer coding removed, content coding kept."""
        connection = self._connection
        if connection is None or self._done:
            return
        try:
            while (data := await connection.messages.body_data()) is not None:
                yield data
            self._done = True
        except (http1.Http1Error, OSError) as exc:
            self._keep_alive = False
            raise ProtocolError(f"the body broke off: {exc or type(exc).__name__}") from exc
        finally:
            if self._done:
                await self.aclose()

    def buffered(self, limit: int) -> bytes | None:
        """The whole body when it has all arrived already (as `read(limit)` would return it), the
        connection given back; None, nothing read, when it has not (then `read` it)."""
        connection = self._connection
        if connection is None or self._done:
            return None
        body = connection.messages.buffered_body(limit)
        if body is not None:
            self._done = True
            self._give_back()
        return body

    async def aclose(self) -> None:
        """Give the connection back for reuse when the body was read to its end, else close it."""
        self._give_back()

    def _give_back(self) -> None:
        connection = self._connection
        if connection is None:
            return
        self._connection = None
        if self._done and self._keep_alive:
            self._client._release(self._origin, connection)
        else:
            connection.close()


class BodyTooLarge(ProtocolError):
    pass


class HttpClient:
    """Pooled HTTP/1.1 connections per origin (no limit on their number: streams may be many)."""

    def __init__(self, connect_timeout: float, max_idle_per_origin: int = 256,
                 ssl_context: ssl.SSLContext | None = None,
                 connector: Callable[[Origin], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
                 | None = None) -> None:
        """`connector` opens each new connection (per-provider TLS and proxies: arbstr.connect);
        without one, a direct connection with `ssl_context` (the system's trust by default)."""
        self.connect_timeout = connect_timeout
        self.max_idle_per_origin = max_idle_per_origin
        self._ssl = ssl_context
        self._connector = connector
        self._idle: dict[Origin, list[_Connection]] = {}
        self._closed = False

    async def request(self, method: str, url: str, headers: Sequence[tuple[bytes, bytes]],
                      body: bytes = b"") -> Response:
        """Send a request once and return when the response head is in. Cancelling closes the
        connection. ConnectError: not sent; ProtocolError (NoResponse): sent, no usable answer."""
        origin, target = split_url(url)
        raw = http1.request_bytes(method.encode(), target.encode(), origin.netloc.encode(), headers, body)
        connection = await self._acquire(origin)
        try:
            connection.writer.write(raw)
            await connection.writer.drain()
            head = await connection.messages.response_head(method)
        except http1.ClosedBeforeHead as exc:
            connection.close()
            raise (NoResponse if not exc.received else ProtocolError)(str(exc)) from exc
        except OSError as exc:  # a reset: written or not, the provider may have read the request
            connection.close()
            kind = ProtocolError if connection.messages.received_any else NoResponse
            raise kind(f"the connection broke: {exc or type(exc).__name__}") from exc
        except http1.Http1Error as exc:
            connection.close()
            raise ProtocolError(f"a broken answer: {exc or type(exc).__name__}") from exc
        except BaseException:
            connection.close()
            raise
        return Response(self, origin, connection, head)

    async def _acquire(self, origin: Origin) -> _Connection:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle and now - idle[0].idle_since > IDLE_TIMEOUT:  # the oldest first: close what expired
            idle.pop(0).close()
        while idle:
            connection = idle.pop()
            if connection.usable(now):
                return connection
            connection.close()
        return await self._connect(origin)

    async def _connect(self, origin: Origin) -> _Connection:
        tls = origin.scheme == "https"
        if tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            opening = self._connector(origin) if self._connector else asyncio.open_connection(
                origin.host, origin.port, ssl=self._ssl if tls else None, server_hostname=origin.host if tls else None)
            reader, writer = await asyncio.wait_for(opening, self.connect_timeout)
        except TimeoutError as exc:
            raise ConnectTimeout(f"no connection to {origin.netloc} within {self.connect_timeout:g} s") from exc
        except (OSError, ssl.SSLError, UnicodeError, ValueError) as exc:
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
