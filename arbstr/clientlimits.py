"""Limits on what a client may make arbstr hold: a deadline for each request head, and its size.

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
from collections.abc import Sequence
from dataclasses import dataclass, field

from mitmproxy import connection, ctx, http

from arbstr.errors import ArbstrError


class HeadersTooLarge(ArbstrError):
    """A request head with too many headers, or too many bytes of them (431)."""

    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


def check_head_size(fields: Sequence[tuple[bytes, bytes]], max_count: int, max_bytes: int) -> None:
    """HeadersTooLarge when the request head is over either limit; one pass, however many headers."""
    if len(fields) > max_count:
        raise HeadersTooLarge(f"The request has {len(fields)} headers; this arbstr accepts at most {max_count} "
                              "(server.max_header_count).")
    size = sum(len(name) + len(value) + 4 for name, value in fields)
    if size > max_bytes:
        raise HeadersTooLarge(f"The request's headers are {size} bytes; this arbstr accepts at most {max_bytes} "
                              "(server.max_header_bytes).")


@dataclass(slots=True)
class _Client:
    in_flight: int = 0
    timer: asyncio.TimerHandle | None = None
    flows: set[str] = field(default_factory=set)
    last: http.HTTPFlow | None = None
    """The last answered flow: while its answer is still being written, the connection is not idle."""


class HeadDeadlines:
    """Closes client connections that do not deliver a request head in time (see the module doc)."""

    def __init__(self) -> None:
        self.timeout = 0.0
        """Seconds; 0 turns the deadlines off."""
        self._clients: dict[str, _Client] = {}
        self._closing: set[asyncio.Task] = set()

    def connected(self, client: connection.Client) -> None:
        if self.timeout > 0:
            self._clients[client.id] = state = _Client()
            self._arm(client, state)

    def disconnected(self, client: connection.Client) -> None:
        state = self._clients.pop(client.id, None)
        if state is not None and state.timer is not None:
            state.timer.cancel()

    def head_received(self, flow: http.HTTPFlow) -> None:
        """A request head is in: no deadline while it is being answered."""
        state = self._clients.get(flow.client_conn.id)
        if state is None or flow.id in state.flows:
            return
        state.flows.add(flow.id)
        state.in_flight += 1
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None

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
            self._arm(flow.client_conn, state)

    def _arm(self, client: connection.Client, state: _Client) -> None:
        state.timer = asyncio.get_running_loop().call_later(self.timeout, self._expire, client)

    def _expire(self, client: connection.Client) -> None:
        state = self._clients.get(client.id)
        if state is None or state.in_flight:
            return
        if state.last is not None and state.last.live:  # its answer is still going out: wait more
            self._arm(client, state)
            return
        # mitmproxy's own way to close an idle client: its connection handler's timeout.
        handler = ctx.master.addons.get("proxyserver").connections.get(client.id)
        if handler is not None:
            task = asyncio.get_running_loop().create_task(handler.on_timeout())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
