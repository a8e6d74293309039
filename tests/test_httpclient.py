"""The addon's own HTTP/1.1 client against scripted servers on loopback."""

from __future__ import annotations

import asyncio

import pytest

from arbstr.httpclient import ConnectError, ConnectTimeout, HttpClient, NoResponse, ProtocolError, split_url


class Scripted:
    """A loopback server that answers each request with the next scripted reply (raw bytes);
    `None` closes the connection instead, `(bytes, "close")` answers then closes. It counts
    connections and keeps what it received."""

    def __init__(self, replies: list) -> None:
        self.replies = replies
        self.connections = 0
        self.received: list[bytes] = []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), 0)
                self.received.append(head + await reader.readexactly(length))
                reply = self.replies.pop(0)
                if reply is None:
                    break
                close = isinstance(reply, tuple)
                writer.write(reply[0] if close else reply)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


def run(coroutine):
    return asyncio.run(coroutine)


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Case: Kept\r\ncontent-length: 2\r\n\r\n{}"


class TestBodies:
    def test_content_length_and_keep_alive(self):
        async def go():
            server = Scripted([OK, OK])
            async with server as url:
                client = HttpClient(connect_timeout=2)
                first = await client.request("POST", url + "/v1/x?y=1", [(b"authorization", b"Bearer k")], b"abc")
                assert (first.status, first.reason, await first.read()) == (200, "OK", b"{}")
                assert (b"X-Case", b"Kept") in first.headers and first.header("x-case") == "Kept"
                second = await client.request("POST", url + "/v1/x", [], b"")
                assert await second.read() == b"{}"
                await client.aclose()
            assert server.connections == 1  # the connection was reused
            assert server.received[0].startswith(b"POST /v1/x?y=1 HTTP/1.1\r\nhost: 127.0.0.1:")
            assert b"authorization: Bearer k\r\n" in server.received[0] and server.received[0].endswith(b"\r\n\r\nabc")
        run(go())

    def test_chunked_arrives_chunk_by_chunk(self):
        reply = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                 b"6\r\ndata: \r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n")

        async def go():
            async with Scripted([reply, OK]) as url:
                client = HttpClient(connect_timeout=2)
                response = await client.request("GET", url + "/", [])
                assert [c async for c in response.iter_raw()] == [b"data: ", b"abc"]
                assert await (await client.request("GET", url + "/", [])).read() == b"{}"
                await client.aclose()
        run(go())

    def test_body_until_close(self):
        async def go():
            server = Scripted([(b"HTTP/1.1 200 OK\r\n\r\nall of it", "close"), OK])
            async with server as url:
                client = HttpClient(connect_timeout=2)
                assert await (await client.request("GET", url + "/", [])).read() == b"all of it"
                assert await (await client.request("GET", url + "/", [])).read() == b"{}"
                await client.aclose()
            assert server.connections == 2
        run(go())

    def test_interim_1xx_is_skipped(self):
        async def go():
            async with Scripted([b"HTTP/1.1 103 Early Hints\r\nlink: x\r\n\r\n" + OK]) as url:
                client = HttpClient(connect_timeout=2)
                assert (await client.request("GET", url + "/", [])).status == 200
                await client.aclose()
        run(go())


class TestFailures:
    def test_a_pooled_connection_the_server_closed_is_replaced_before_writing(self):
        async def go():
            server = Scripted([(OK, "close"), OK])  # the server drops the connection after the first answer
            async with server as url:
                client = HttpClient(connect_timeout=2)
                await (await client.request("GET", url + "/", [])).read()
                await asyncio.sleep(0.05)  # its FIN arrives while the connection sits in the pool
                assert await (await client.request("GET", url + "/", [])).read() == b"{}"
                await client.aclose()
            assert server.connections == 2 and len(server.received) == 2
        run(go())

    def test_a_request_the_server_read_is_never_sent_again(self):
        async def go():
            # The second request is read, then the connection closes without an answer: the
            # server may have acted on it (a Routstr node bills it), so it must not be re-sent.
            server = Scripted([OK, None, OK])
            async with server as url:
                client = HttpClient(connect_timeout=2)
                await (await client.request("POST", url + "/", [], b"{}")).read()
                with pytest.raises(NoResponse) as err:
                    await client.request("POST", url + "/", [], b"{}")
                assert err.value.may_have_reached
                await client.aclose()
            assert len(server.received) == 2 and server.connections == 1
        run(go())

    @pytest.mark.parametrize("reply,message", [
        (b"SPDY/3 200 OK\r\n\r\n", "response line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", "[Cc]ontent-[Ll]ength"),
    ])
    def test_malformed_heads(self, reply, message):
        async def go():
            async with Scripted([reply]) as url:
                client = HttpClient(connect_timeout=2)
                with pytest.raises(ProtocolError, match=message):
                    await client.request("GET", url + "/", [])
                await client.aclose()
        run(go())

    def test_a_body_cut_short(self):
        async def go():
            async with Scripted([(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", "close")]) as url:
                client = HttpClient(connect_timeout=2)
                response = await client.request("GET", url + "/", [])
                with pytest.raises(ProtocolError, match="without sending complete message body"):
                    await response.read()
                await client.aclose()
        run(go())

    def test_refused(self):
        async def go():
            server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            server.close()
            await server.wait_closed()
            with pytest.raises(ConnectError) as err:
                await HttpClient(connect_timeout=2).request("GET", f"http://127.0.0.1:{port}/", [])
            assert isinstance(err.value.__cause__, ConnectionRefusedError)
        run(go())

    def test_cancelled_while_waiting_closes_the_connection(self):
        async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # until the client closes
            writer.close()

        async def go():
            server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
            url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            client = HttpClient(connect_timeout=2)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.request("GET", url + "/", []), 0.2)
            assert not client._idle.get(split_url(url + "/")[0])
            await client.aclose()
            server.close()
        run(go())


def test_connect_timeout_is_its_own_error(monkeypatch):
    async def slow(*args, **kwargs):
        await asyncio.sleep(5)

    monkeypatch.setattr(asyncio, "open_connection", slow)
    with pytest.raises(ConnectTimeout):
        run(HttpClient(connect_timeout=0.05).request("GET", "http://127.0.0.1:9/", []))


def test_split_url():
    origin, target = split_url("https://Node.example/v1/chat/completions?x=1")
    assert (origin.scheme, origin.host, origin.port, origin.netloc, target) == (
        "https", "node.example", 443, "node.example", "/v1/chat/completions?x=1")
    assert split_url("http://h:8080")[0].netloc == "h:8080"
    with pytest.raises(ValueError):
        split_url("ftp://h/")
