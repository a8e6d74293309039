"""Clients that try to hold the proxy: huge request heads get a 431 without stalling anyone else,
and connections that never finish a request head are closed while normal requests go on."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time

import httpx
import pytest

from conftest import chat_requests, provider_toml

VALID = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def limited(start_provider, start_proxy):
    provider = start_provider("p", ["gpt-4o"], 0.001, 0.001)
    proxy = start_proxy("serve", provider_toml("p", provider.url, ["gpt-4o"], 1, 1)
                        + '[server]\nclient_header_timeout = 1.5\n'
                        + '[routing]\nhealth_interval = 0\n[database]\npath = ":memory:"\n')
    return provider, proxy


def many_headers_request(count: int) -> bytes:
    body = json.dumps(VALID).encode()
    head = [b"POST /v1/chat/completions HTTP/1.1", b"host: arbstr", b"content-type: application/json",
            b"content-length: %d" % len(body)]
    head += [b"x-filler-%d: %d" % (i, i) for i in range(count)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def send_raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


def test_ten_thousand_headers_get_a_431_while_health_keeps_answering(limited):
    provider, proxy = limited
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        floods = [pool.submit(send_raw, proxy.port, many_headers_request(10_000)) for _ in range(6)]
        with httpx.Client(base_url=proxy.url, timeout=30) as http:
            answers = [http.get("/health")]  # at least one while the floods are on their way
            while not all(f.done() for f in floods):
                answers.append(http.get("/health"))
        for flood in floods:
            head, _, body = flood.result().partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 431"), head[:100]
            assert json.loads(body)["error"]["code"] == "request_headers_too_large"
    assert answers and all(a.status_code == 200 and a.json()["providers"] for a in answers)
    assert not chat_requests(provider)
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        headers = {f"x-few-{i}": "v" for i in range(50)}
        assert http.post("/v1/chat/completions", json=VALID, headers=headers).status_code == 200
        big = http.post("/v1/chat/completions", json=VALID, headers={"x-big": "v" * 70_000})
        assert big.status_code == 431 and "max_header_bytes" in big.json()["error"]["message"]


def test_slow_and_silent_clients_are_closed_and_others_served(limited):
    provider, proxy = limited
    sockets = []
    for i in range(100):
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        if i % 2:  # half send a head that never ends, a byte at a time; half send nothing
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        sockets.append(sock)
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        started = time.monotonic()
        closed: set[int] = set()
        while len(closed) < len(sockets) and time.monotonic() - started < 30:
            for index, sock in enumerate(sockets):
                if index in closed:
                    continue
                try:
                    sock.sendall(b"x")  # a trickle: activity that resets mitmproxy's idle timer
                    sock.setblocking(False)
                    if sock.recv(1) == b"":
                        closed.add(index)
                except BlockingIOError:
                    pass
                except OSError:
                    closed.add(index)
                finally:
                    sock.setblocking(True)
            assert http.post("/v1/chat/completions", json=VALID).status_code == 200
            time.sleep(0.2)
    for sock in sockets:
        sock.close()
    assert len(closed) == len(sockets)
    assert proxy.process.poll() is None


def test_a_keep_alive_client_gets_its_answers_then_its_idle_connection_closed(limited):
    provider, proxy = limited
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        for _ in range(3):  # a request after each pause shorter than the deadline reuses the connection
            assert http.post("/v1/chat/completions", json=VALID).status_code == 200
            time.sleep(0.5)
        stream = http.post("/v1/chat/completions", json=VALID | {"stream": True})
        assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
        time.sleep(2.5)  # longer than the deadline: the idle connection is closed, httpx opens another
        assert http.post("/v1/chat/completions", json=VALID).status_code == 200
