"""arbstr.http1's response heads framed exactly as mitmproxy frames them."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.net.http.http1 import connection_close, expected_http_body_size, read_response_head

from arbstr import http1

_NAMES = st.sampled_from([b"Content-Length", b"content-length", b"Transfer-Encoding", b"transfer-encoding",
                          b"Connection", b"CONNECTION", b"content-type", b"x-other"])
_VALUES = st.sampled_from([b"12", b"0", b"012", b" 7", b"-1", b"1e3", b"", b"chunked", b"gzip, chunked",
                           b"gzip,chunked", b"Chunked", b"identity", b"gzip", b"br", b"close", b"keep-alive",
                           b"Close", b"keep-alive, close", b"upgrade", b"application/json", b"\xc3\xa9"])


def mitmproxy_framing(method: str, lines: list[bytes]) -> tuple[str, object]:
    """What mitmproxy's own head reader decides: (body size, keep-alive), or the error it raises."""
    try:
        response = read_response_head(lines)
        size = expected_http_body_size(SimpleNamespace(method=method), response)
        return "ok", (size, not connection_close(response.http_version, response.headers))
    except ValueError:
        return "error", None


def read_head(data: bytes, method: str = "POST") -> http1.ResponseHead:
    async def read() -> http1.ResponseHead:
        stream = asyncio.StreamReader()
        stream.feed_data(data)
        return await http1.MessageReader(stream).response_head(method)
    return asyncio.run(read())


def arbstr_framing(method: str, lines: list[bytes]) -> tuple[str, object]:
    try:
        head = read_head(b"\r\n".join(lines) + b"\r\n\r\n", method)
        return "ok", (head.body_size, head.keep_alive)
    except http1.Http1Error:
        return "error", None


@settings(max_examples=600, deadline=None)
@given(method=st.sampled_from(["POST", "GET", "HEAD", "CONNECT"]),
       version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
       status=st.sampled_from([200, 201, 204, 206, 304, 400, 402, 404, 500, 503]),
       headers=st.lists(st.tuples(_NAMES, _VALUES), max_size=6))
def test_size_and_keep_alive_are_mitmproxys(method, version, status, headers):
    lines = [b"%s %d Reason" % (version, status), *(name + b": " + value for name, value in headers)]
    assert arbstr_framing(method, lines) == mitmproxy_framing(method, lines)


@pytest.mark.parametrize("lines,size,keep_alive", [
    ([b"HTTP/1.1 200 OK", b"Content-Length: 5"], 5, True),
    ([b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked"], None, True),
    ([b"HTTP/1.1 200 OK"], -1, True),
    ([b"HTTP/1.0 200 OK", b"Content-Length: 5"], 5, False),
    ([b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Connection: close"], 5, False),
    ([b"HTTP/1.1 204 No Content", b"Content-Length: 5"], 0, True),
])
def test_known_heads(lines, size, keep_alive):
    assert arbstr_framing("POST", lines) == ("ok", (size, keep_alive))


def test_interim_answers_are_skipped_and_the_head_keeps_its_headers():
    head = read_head(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Made\r\nX-A: 1\r\n"
                     b" folded\r\nX-A: 2\r\ncontent-length: 0\r\n\r\n")
    assert (head.status, head.reason, head.headers, head.body_size) == \
        (201, "Made", [(b"X-A", b"1\r\n folded"), (b"X-A", b"2"), (b"content-length", b"0")], 0)


@pytest.mark.parametrize("start", [b"HTTP/2.0 200 OK", b"HTTP/1.1 abc OK", b"garbage"])
def test_a_bad_status_line_is_an_http1_error(start):
    assert arbstr_framing("POST", [start])[0] == "error"


_PIECES = st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 404 Not Found", b"HTTP/1.1 201", b"\r\n", b"\n", b"\r",
                           b"Content-Length: 3", b"content-length:3", b"X-A:  spaced  ", b"X-B:", b": no name",
                           b"no colon", b" folded", b"\tfolded", b"x", b":", b"Connection: close"])


def general_path(data: bytes) -> tuple:
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(http1, "_plain_head", lambda buffer: None)
        return read_outcome(data)


def read_outcome(data: bytes) -> tuple:
    """What reading a head and its body gives: the head's figures and the body, or the error's type."""
    async def read() -> tuple:
        stream = asyncio.StreamReader()
        stream.feed_data(data)
        stream.feed_eof()
        reader = http1.MessageReader(stream)
        try:
            head = await reader.response_head()
            return head.status, head.reason, head.headers, head.body_size, head.keep_alive, await reader.body(1000)
        except (http1.Http1Error, IndexError) as exc:
            return (type(exc),)
    return asyncio.run(read())


@settings(max_examples=800, deadline=None)
@given(st.lists(_PIECES, max_size=10).map(b"".join))
def test_plain_heads_read_as_the_general_path_reads_them(data):
    data = b"HTTP/1.1 200 OK\r\n" + data + b"\r\n\r\nabc" if data[:1] not in (b"H", b"\r", b"\n") else data + b"\r\n\r\nabc"
    assert read_outcome(data) == general_path(data)


def test_a_plain_head_takes_the_plain_path(monkeypatch):
    taken = []
    plain = http1._plain_head
    monkeypatch.setattr(http1, "_plain_head", lambda buffer: taken.append(plain(buffer)) or taken[-1])
    assert read_outcome(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nhi")[:4] == \
        (200, "OK", [(b"Content-Length", b"2"), (b"X-A", b"b")], 2)
    assert taken[-1] is not None


@pytest.mark.parametrize("data,limit,taken", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 100, b"hello"),  # all there: taken at once
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 100, b""),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", 100, None),  # not all there yet
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 4, None),  # over the limit: read() refuses it
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 100, None),
    (b"HTTP/1.1 200 OK\r\n\r\nhello", 100, None),  # until the connection closes
])
def test_a_body_that_has_all_arrived_is_taken_at_once(data, limit, taken):
    async def read() -> tuple[bytes | None, object]:
        stream = asyncio.StreamReader()
        stream.feed_data(data)
        stream.feed_eof()
        reader = http1.MessageReader(stream)
        await reader.response_head()
        at_once = reader.buffered_body(limit)
        try:
            rest = await reader.body()
        except http1.Http1Error as exc:
            rest = type(exc)
        return at_once, rest
    at_once, rest = asyncio.run(read())
    assert at_once == taken
    # Taken: nothing of it is left to read. Not taken: the body reads as it would have.
    assert rest == (b"" if taken is not None else read_outcome(data)[-1])
