"""How a provider's stream reaches mitmproxy: a loopback HTTP/1.1 endpoint in the same process.

mitmproxy cannot take a response body from an addon piece by piece, but it streams what a server
sends. So the addon points the flow at this relay with a one-time ticket; the relay answers with
the provider's status and headers and then each chunk the moment the provider sends it. The
exchange behind it keeps its deadlines; a client that leaves stops the writing, not the reading:
the rest of the stream is still read (when configured) so the usage the provider bills is seen.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from arbstr import http1
from arbstr.errors import UpstreamError
from arbstr.exchange import EndState, Exchange


class StreamTap:
    """Sees a relayed stream's bytes as they pass, and how it ended. The default sees nothing."""

    def feed(self, chunk: bytes) -> None:
        pass

    def complete(self) -> bool:
        """Whether what was fed is a whole answer (a chat stream's `[DONE]`)."""
        return True

    def finish(self, exchange: Exchange) -> None:
        pass


@dataclass(slots=True)
class _Pending:
    exchange: Exchange
    tap: StreamTap
    expiry: asyncio.TimerHandle
    extra_headers: list[tuple[bytes, bytes]]


class StreamRelay:
    """Serves streams the dispatcher has already opened, to mitmproxy, by ticket."""

    TICKET_HEADER = "x-arbstr-relay-ticket"
    UNCLAIMED_TIMEOUT = 30.0

    def __init__(self, drain_when_client_gone: bool = True) -> None:
        self.drain_when_client_gone = drain_when_client_gone
        self._pending: dict[str, _Pending] = {}
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close every connection (their handlers then end on their own) and unclaimed stream."""
        if self._server:
            self._server.close()
        for writer in list(self._connections.values()):
            writer.transport.abort()
        for ticket in list(self._pending):
            await self._drop(ticket)
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=1.0)

    def register(self, exchange: Exchange, tap: StreamTap | None = None,
                 extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> str:
        """A ticket for mitmproxy to claim the stream with; unclaimed streams are closed.
        `extra_headers` are sent after the provider's own."""
        ticket = secrets.token_urlsafe(24)
        loop = asyncio.get_running_loop()
        expiry = loop.call_later(self.UNCLAIMED_TIMEOUT, lambda: loop.create_task(self._drop(ticket)))
        self._pending[ticket] = _Pending(exchange, tap or StreamTap(), expiry, list(extra_headers))
        return ticket

    async def _drop(self, ticket: str) -> None:
        pending = self._pending.pop(ticket, None)
        if pending:
            pending.expiry.cancel()
            pending.exchange.client_gone = True
            await pending.exchange.close(EndState.CLIENT_GONE)
            pending.tap.finish(pending.exchange)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections[task] = writer
        messages = http1.MessageReader(reader)
        ticket_header = self.TICKET_HEADER.encode()
        try:
            while True:
                try:
                    head = await messages.request_head()
                except http1.ClosedBeforeHead:
                    return
                await messages.body(limit=http1.MAX_HEAD_BYTES)
                ticket = (head.header(ticket_header) or b"").decode("latin-1")
                pending = self._pending.pop(ticket, None)
                if pending is None:
                    body = UpstreamError("The provider's stream was no longer waiting for this request; "
                                         "send it again.", code="stream_expired").to_json()
                    writer.write(http1.response_head_bytes(502, b"Bad Gateway", [
                        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]) + body)
                    await writer.drain()
                    continue
                pending.expiry.cancel()
                if not await self._relay(pending, writer):
                    return
        except (ConnectionError, http1.Http1Error):
            return
        finally:
            self._connections.pop(task, None)
            writer.close()

    async def _relay(self, pending: _Pending, writer: asyncio.StreamWriter) -> bool:
        """Stream one response; True when it ended cleanly and the connection can serve another."""
        exchange, tap = pending.exchange, pending.tap
        head = http1.response_head_bytes(exchange.status, exchange.reason.encode("latin-1", "replace"),
                                         [*exchange.headers, *pending.extra_headers,
                                          (b"transfer-encoding", b"chunked")])
        try:
            writer.write(head)
            async for data in exchange.chunks(self.drain_when_client_gone, tap.complete):
                tap.feed(data)
                if exchange.client_gone:
                    continue
                try:
                    writer.write(http1.chunk(data))
                    await writer.drain()
                except ConnectionError:
                    exchange.client_gone = True
            if not exchange.client_gone and exchange.attempt.state is EndState.OK:
                # A stream that broke off or stalled is not given a clean end: the connection is
                # closed mid-body, so the client sees it was cut.
                try:
                    writer.write(http1.LAST_CHUNK)
                    await writer.drain()
                except ConnectionError:
                    exchange.client_gone = True
        except asyncio.CancelledError:
            exchange.client_gone = True
            await exchange.close(EndState.CLIENT_GONE)
            raise
        finally:
            tap.finish(exchange)
        return exchange.attempt is not None and exchange.attempt.state is EndState.OK
