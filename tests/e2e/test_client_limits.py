"""Clients that try to hold the proxy: huge request heads get a 431 without stalling anyone else,
and connections that never finish a request head are closed while normal requests go on."""

from __future__ import annotations

import concurrent.futures
import json
import random
import socket
import statistics
import threading
import time

import httpx
import pytest

from conftest import chat_requests, provider_toml

SEED = 20261130
VALID = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def limited(start_provider, start_proxy):
    provider = start_provider("p", ["gpt-4o"], 0.001, 0.001)
    proxy = start_proxy("serve", provider_toml("p", provider.url, ["gpt-4o"], 1, 1)
                        + '[server]\nclient_header_timeout = 1.5\n'
                        + '[routing]\nhealth_interval = 0\n[database]\npath = ":memory:"\n')
    return provider, proxy


def many_headers_request(count: int, header: bytes = b"x-filler-%d: %d") -> bytes:
    body = json.dumps(VALID).encode()
    head = [b"POST /v1/chat/completions HTTP/1.1", b"host: arbstr", b"content-type: application/json",
            b"content-length: %d" % len(body)]
    head += [header % (i, i) for i in range(count)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


FLOODS = [
    many_headers_request(10_000),  # 200 kB: refused once its first 80 kB are in, unended
    many_headers_request(10_000, b"%d:%d"),  # ends within max_header_bytes: refused on its count
]


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


def flood(port: int, seed: int, stop: threading.Event) -> list[bytes]:
    """Oversized request heads, one connection after another, until `stop`; the answers."""
    rng = random.Random(seed)
    answers = [send_raw(port, rng.choice(FLOODS))]
    while not stop.is_set():
        answers.append(send_raw(port, rng.choice(FLOODS)))
    return answers


def test_ten_thousand_headers_get_a_431_while_health_keeps_answering(limited):
    """The issue's bound: /health answers within 100 ms while clients keep sending 10k-header heads
    (while mitmproxy parsed such heads before arbstr saw them, 10 such clients held it 150-400 ms)."""
    provider, proxy = limited
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        floods = [pool.submit(flood, proxy.port, SEED + i, stop) for i in range(10)]
        with httpx.Client(base_url=proxy.url, timeout=30) as http:
            time.sleep(0.3)  # every flood under way
            probes = []
            for _ in range(15):
                started = time.perf_counter()
                answer = http.get("/health")
                probes.append(time.perf_counter() - started)
                assert answer.status_code == 200 and answer.json()["providers"]
                time.sleep(0.05)
            flooding = not any(f.done() for f in floods)
        stop.set()
        answers = [answer for f in floods for answer in f.result()]
    assert flooding, "a flood ended before /health was measured"
    assert statistics.median(probes) < 0.1, sorted(probes)
    assert len(answers) >= 10 * 2
    for received in answers:
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431"), head[:100]
        assert json.loads(body)["error"]["code"] == "request_headers_too_large"
    assert not chat_requests(provider)
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        headers = {f"x-few-{i}": "v" for i in range(50)}
        assert http.post("/v1/chat/completions", json=VALID, headers=headers).status_code == 200
        big = http.post("/v1/chat/completions", json=VALID, headers={"x-big": "v" * 70_000})
        assert big.status_code == 431 and "max_header_bytes" in big.json()["error"]["message"]
        many = http.post("/v1/chat/completions", json=VALID, headers={f"x-{i}": "v" for i in range(300)})
        assert many.status_code == 431 and "max_header_count" in many.json()["error"]["message"]


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


def test_mitmdump_refuses_heads_before_parsing_them_too(start_provider, start_proxy):
    """mitmdump loads the addon ahead of mitmproxy's own layer choice; the head limits hold there too."""
    provider = start_provider("p", ["gpt-4o"], 0.001, 0.001)
    proxy = start_proxy("mitmdump", provider_toml("p", provider.url, ["gpt-4o"], 1, 1)
                        + '[routing]\nhealth_interval = 0\n[database]\npath = ":memory:"\n')
    for data, message in ((FLOODS[0], "has not ended after"), (FLOODS[1], "max_header_count")):
        head, _, body = send_raw(proxy.port, data).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431"), head[:100]
        assert message in json.loads(body)["error"]["message"]
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        assert http.post("/v1/chat/completions", json=VALID).status_code == 200
