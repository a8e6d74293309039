"""Head deadlines on a real event loop: one timer per connection, closed when the deadline passes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

from mitmproxy.test import taddons

from arbstr.clientlimits import HeadDeadlines

TIMEOUT = 0.3


class ProxyServer:
    """Stands in for mitmproxy's proxyserver addon: records which connections it was told to time out."""

    def __init__(self) -> None:
        self.closed: list[str] = []
        self.connections: dict[str, SimpleNamespace] = {}

    def add(self, client_id: str) -> SimpleNamespace:
        async def on_timeout() -> None:
            self.closed.append(client_id)
        self.connections[client_id] = SimpleNamespace(on_timeout=on_timeout)
        return SimpleNamespace(id=client_id)


def flow(client: SimpleNamespace, number: int) -> SimpleNamespace:
    return SimpleNamespace(id=f"{client.id}-{number}", client_conn=client, live=False)


async def closed_within(server: ProxyServer, client_id: str, seconds: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while client_id not in server.closed and loop.time() < end:
        await asyncio.sleep(0.01)
    return client_id in server.closed


def run(scenario: Callable[[ProxyServer, HeadDeadlines], Awaitable[None]]) -> None:
    """`scenario` on mitmproxy's event loop, with deadlines of TIMEOUT and a proxyserver that records closes."""
    server = ProxyServer()
    with taddons.context(server) as tctx:
        deadlines = HeadDeadlines()
        deadlines.timeout = TIMEOUT
        tctx.master.event_loop.run_until_complete(scenario(server, deadlines))


def test_keep_alive_requests_share_one_timer_and_the_deadline_counts_from_the_last_answer():
    async def scenario(server: ProxyServer, deadlines: HeadDeadlines) -> None:
        client = server.add("c1")
        loop = asyncio.get_running_loop()
        armed = []
        call_at = loop.call_at

        def counting_call_at(when, callback, *args, **kwargs):
            if callback == deadlines._expire:
                armed.append(when)
            return call_at(when, callback, *args, **kwargs)
        loop.call_at = counting_call_at  # call_later goes through it too
        try:
            deadlines.connected(client)
            for number in range(20):  # together two deadlines long
                request = flow(client, number)
                deadlines.head_received(request)
                await asyncio.sleep(0.03)
                deadlines.answered(request)
            answered_last = loop.time()
        finally:
            del loop.call_at
        assert len(armed) <= 5  # about one timer per deadline that passed, not one per request
        await asyncio.sleep(TIMEOUT * 2 / 3)
        assert server.closed == []  # a deadline counts from the last answer, not the first one
        assert await closed_within(server, "c1", 5.0)
        assert asyncio.get_running_loop().time() - answered_last >= TIMEOUT
    run(scenario)


def test_no_deadline_while_a_request_is_answered():
    async def scenario(server: ProxyServer, deadlines: HeadDeadlines) -> None:
        client = server.add("c2")
        deadlines.connected(client)
        request = flow(client, 1)
        deadlines.head_received(request)
        await asyncio.sleep(TIMEOUT * 2)  # the connection's first timer fires meanwhile
        assert server.closed == []
        deadlines.answered(request)
        await asyncio.sleep(TIMEOUT * 2 / 3)
        assert server.closed == []
        assert await closed_within(server, "c2", 5.0)
    run(scenario)


def test_a_silent_client_is_closed_and_a_gone_one_forgotten():
    async def scenario(server: ProxyServer, deadlines: HeadDeadlines) -> None:
        silent, gone = server.add("c3"), server.add("c4")
        deadlines.connected(silent)
        deadlines.connected(gone)
        deadlines.disconnected(gone)
        assert await closed_within(server, "c3", 5.0)
        await asyncio.sleep(TIMEOUT)
        assert server.closed == ["c3"]
    run(scenario)
