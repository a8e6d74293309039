"""Limits on what a client may make arbstr hold: a deadline for each request head, and its size.

mitmproxy gathers an HTTP/1 request head however long it gets and parses all of it before the
first hook runs: ten thousand headers cost the event loop ~20 ms each, so a few clients sending
them kept /health and every other request waiting. `LimitedHttp1Server` (put in place by
`choose_http_server` from the `next_layer` hook) counts a head's lines as they arrive and answers a
431 before mitmproxy parses any of them; `check_head_size` in the `requestheaders` hook holds the
same limits for HTTP/2 heads, which h2 decodes before arbstr sees them.

mitmproxy closes a client connection only after `tcp_timeout` seconds (600 by default) with no
byte in either direction, so a client that sends its request head a byte at a time (slowloris),
or never, holds a connection and its descriptor as long as it likes. `HeadDeadlines` gives each
client connection `client_header_timeout` seconds from its start, or from the end of its
previous answer, to deliver a complete request head; then mitmproxy closes it. A connection
with a request in flight, or one that became a CONNECT tunnel (regular mode), has no deadline
until its answer has gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from mitmproxy import connection, ctx, http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import HttpLayer
from mitmproxy.proxy.layers.http import Http1Server
from mitmproxy.utils import human

from arbstr.errors import ArbstrError
from arbstr.http1 import ReceiveBuffer, closing_error, line_feeds

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""What an HTTP/2 client with prior knowledge sends first on a cleartext connection (RFC 9113 3.4)."""
REQUEST_LINE_BYTES = 16 * 1024
"""What the request line may add to max_header_bytes before an unfinished head is refused (URLs run long)."""


class HeadersTooLarge(ArbstrError):
    """A request head with too many headers, or too many bytes of them (431)."""

    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


def check_head_size(fields: Sequence[tuple[bytes, bytes]], max_count: int, max_bytes: int) -> None:
    """HeadersTooLarge when the request head is over either limit; one pass, however many headers."""
    if len(fields) > max_count:
        raise _too_many(len(fields), max_count)
    _check_bytes(sum(len(name) + len(value) + 4 for name, value in fields), max_bytes)


def _too_many(count: int, max_count: int) -> HeadersTooLarge:
    return HeadersTooLarge(f"The request has {count} headers; this arbstr accepts at most {max_count} "
                           "(server.max_header_count).")


def _check_bytes(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise HeadersTooLarge(f"The request's headers are {size} bytes; this arbstr accepts at most {max_bytes} "
                              "(server.max_header_bytes).")


def choose_http_server(nextlayer: layer.NextLayer, max_count: int, max_bytes: int) -> None:
    """After mitmproxy chose an HTTP layer for a client connection: HTTP/2 for a cleartext client
    that starts with the HTTP/2 preface (mitmproxy only offers h2 through TLS's ALPN and would
    read the preface as a broken HTTP/1 request), else an HTTP/1 server that holds the head limits."""
    if nextlayer.layer is None:
        # mitmdump and mitmweb load scripts ahead of mitmproxy's own layer choice: make it now
        # (it leaves a choice already made alone, so it does not run twice).
        chooser = ctx.master.addons.get("nextlayer")
        if chooser is not None:
            chooser.next_layer(nextlayer)
    http_layer = nextlayer.layer
    if not isinstance(http_layer, HttpLayer):
        return
    client = nextlayer.context.client
    if client.alpn is None and nextlayer.data_client().startswith(H2_PREFACE):
        if ctx.options.http2:
            client.alpn = b"h2"  # what the HTTP layer looks at to speak HTTP/2 (and converts to HTTP/1 for servers)
        return
    if client.alpn in (None, b"http/1.1", b"http/1.0"):
        # The HTTP layer takes a server connection it finds already set (mitmproxy's client playback does this).
        http_layer.connections[client] = LimitedHttp1Server(http_layer.context.fork(), max_count, max_bytes)


class LimitedHttp1Server(Http1Server):
    """mitmproxy's HTTP/1 server side, refusing a request head over the limits before it is parsed:
    h11's buffer finds the head's lines as they arrive (as it does for mitmproxy), they are counted,
    and a head over either limit, or one still unfinished past max_header_bytes, gets a 431."""

    def __init__(self, context, max_count: int, max_bytes: int) -> None:
        super().__init__(context)
        self.max_count, self.max_bytes = max_count, max_bytes

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        # Not a generator itself: it hands back mitmproxy's (or the refusal), so the commands of
        # every request head are not passed up through one more generator frame. The head is
        # checked when the state is called; the connection has put the new data in the buffer by then.
        if isinstance(event, events.DataReceived):
            try:
                self._check_head()
            except HeadersTooLarge as exc:
                return self._refuse(exc)
        return super().read_headers(event)

    def _check_head(self) -> None:
        feeds = line_feeds(self.buf)
        if feeds is not None and feeds <= self.max_count and len(self.buf) + feeds <= self.max_bytes:
            # Whatever of a head the buffer holds is within both limits (each header line ends in a
            # line feed and counts its bytes plus at most one more): mitmproxy parses it, and only
            # it, as it would without limits. Almost every request passes here.
            return
        lines = self.buf.maybe_extract_lines()
        while lines == []:  # an empty line before the request line, which HTTP/1.1 tolerates
            lines = self.buf.maybe_extract_lines()
        if lines is None:  # the head has not ended yet
            if len(self.buf) > self.max_bytes + REQUEST_LINE_BYTES:
                raise HeadersTooLarge(f"The request head has not ended after {len(self.buf)} bytes; this arbstr "
                                      f"accepts headers of at most {self.max_bytes} bytes (server.max_header_bytes).")
            return
        if len(lines) - 1 > self.max_count:
            raise _too_many(len(lines) - 1, self.max_count)
        _check_bytes(sum(len(line) + 2 for line in lines[1:]), self.max_bytes)
        # Within the limits: give the head back for mitmproxy to parse, ahead of what followed it.
        rest = self.buf.maybe_extract_at_most(len(self.buf)) or b""
        self.buf = ReceiveBuffer()
        self.buf += b"\r\n".join(lines) + b"\r\n\r\n" + rest

    def _refuse(self, error: HeadersTooLarge) -> layer.CommandGenerator[None]:
        yield commands.SendData(self.conn, closing_error(error))
        # Only our side closes: closing while the client still sends its head would reset the
        # connection, and the 431 with it. What it sends is dropped until it closes (or its
        # header-read deadline closes it).
        yield commands.CloseTcpConnection(self.conn, half_close=True)
        yield commands.Log(f"{human.format_address(self.conn.peername)}: {error.message}", logging.DEBUG)
        self.state = self._drop

    def _drop(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            self.buf = ReceiveBuffer()
        elif isinstance(event, events.ConnectionClosed):
            yield commands.CloseConnection(self.conn)


@dataclass(slots=True)
class _Client:
    in_flight: int = 0
    deadline: float = 0.0
    """Event-loop time by which the next request head must be in (while none is in flight)."""
    timer: asyncio.TimerHandle | None = None
    """Fires at or before the deadline; a deadline moved later since is re-armed then."""
    flows: set[str] = field(default_factory=set)
    last: http.HTTPFlow | None = None
    """The last answered flow: while its answer is still being written, the connection is not idle."""


class HeadDeadlines:
    """Closes client connections that do not deliver a request head in time (see the module doc).

    A keep-alive client sends request after request: instead of a timer made and cancelled for
    each one, a connection keeps one timer, and when it fires before the (since moved) deadline it
    is set again for the rest. A connection is closed at the same moment either way."""

    def __init__(self) -> None:
        self.timeout = 0.0
        """Seconds; 0 turns the deadlines off."""
        self._clients: dict[str, _Client] = {}
        self._closing: set[asyncio.Task] = set()

    def connected(self, client: connection.Client) -> None:
        if self.timeout > 0:
            self._clients[client.id] = state = _Client()
            self._restart(client, state)

    def disconnected(self, client: connection.Client) -> None:
        state = self._clients.pop(client.id, None)
        if state is not None and state.timer is not None:
            state.timer.cancel()

    def head_received(self, flow: http.HTTPFlow) -> None:
        """A request head is in: no deadline while it is being answered (a timer that fires
        meanwhile does nothing)."""
        state = self._clients.get(flow.client_conn.id)
        if state is None or flow.id in state.flows:
            return
        state.flows.add(flow.id)
        state.in_flight += 1

    def tunnel_opened(self, client: connection.Client) -> None:
        """A CONNECT succeeded: what follows is TLS or another protocol, not request heads (yet)."""
        state = self._clients.get(client.id)
        if state is not None:
            state.in_flight, state.flows = 0, set()
            if state.timer is not None:
                state.timer.cancel()
                state.timer = None

    def answered(self, flow: http.HTTPFlow) -> None:
        """An answer (or an error) ended a request: the next head has its own deadline."""
        state = self._clients.get(flow.client_conn.id)
        if state is None or flow.id not in state.flows:
            return
        state.flows.discard(flow.id)
        state.in_flight -= 1
        state.last = flow
        if state.in_flight == 0:
            self._restart(flow.client_conn, state)

    def _restart(self, client: connection.Client, state: _Client) -> None:
        """The deadline is `timeout` from now; a timer already set (for an earlier moment) stays."""
        loop = asyncio.get_running_loop()
        state.deadline = loop.time() + self.timeout
        if state.timer is None:
            state.timer = loop.call_at(state.deadline, self._expire, client)

    def _expire(self, client: connection.Client) -> None:
        state = self._clients.get(client.id)
        if state is None:
            return
        state.timer = None
        if state.in_flight:
            return  # its answer restarts the deadline
        loop = asyncio.get_running_loop()
        if loop.time() < state.deadline:
            state.timer = loop.call_at(state.deadline, self._expire, client)
            return
        if state.last is not None and state.last.live:  # its answer is still going out: wait more
            self._restart(client, state)
            return
        # mitmproxy's own way to close an idle client: its connection handler's timeout.
        handler = ctx.master.addons.get("proxyserver").connections.get(client.id)
        if handler is not None:
            task = asyncio.get_running_loop().create_task(handler.on_timeout())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
