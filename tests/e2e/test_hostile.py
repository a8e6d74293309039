"""Hostile input at the real proxy: always a JSON error or a completion, never a 5xx from arbstr,
never a hang, and the proxy keeps serving. Also inbound auth and the body limit."""

from __future__ import annotations

import json
import os
import random
import socket

import httpx
import pytest

from conftest import chat_requests, provider_toml

SEED = 20261123
VALID = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
PATHS = ["/v1/chat/completions", "/chat/completions", "/v1/chat/completions/", "/v1/models", "/health",
         "/providers", "/v1/stats", "/v1/requests", "/", "/v1", "/v1/embeddings", "/%00", "/" + "a" * 3000,
         "/v1/chat/completions?x=1&x=2", "/v1/stats?range=forever", "/v1/requests?limit=-5", "/ü/😀",
         "/v1/stats?since=2026-02-30", "/v1/requests?offset=99999999999999999999"]
METHODS = ["POST"] * 6 + ["GET"] * 2 + ["PUT", "DELETE", "PATCH", "OPTIONS"]
ODD_VALUES = [None, True, False, 0, -1, 2**70, 1.5e308, "", "x" * 5000, [], {}, [None], {"a": {"b": [1]}},
              "\u0000", "😀" * 50, [{"role": "user"}], [{"role": "user", "content": 5}],
              [{"role": "user", "content": [{"type": "text", "text": 7}]}]]


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 6 else 4)
    if kind == 0:
        return rng.choice(ODD_VALUES)
    if kind == 1:
        return rng.randint(-10**6, 10**6)
    if kind == 2:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(20)))
    if kind == 3:
        return rng.random()
    if kind == 4:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["model", "messages", "stream", "max_tokens", "x", "max_completion_tokens"]):
            random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def random_body(rng: random.Random) -> bytes:
    choice = rng.randrange(6)
    if choice == 0:
        return rng.randbytes(rng.randrange(300))
    if choice == 1:
        return json.dumps(random_json(rng)).encode()
    if choice == 2:  # a valid request with one field made strange
        body = dict(VALID)
        body[rng.choice(["model", "messages", "stream", "max_tokens", "temperature"])] = rng.choice(ODD_VALUES)
        return json.dumps(body).encode()
    if choice == 3:
        return json.dumps(VALID | {"stream": rng.random() < 0.5}).encode()
    if choice == 4:
        return b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "' + rng.randbytes(40) + b'"}]}'
    return json.dumps(VALID).encode()[: rng.randrange(40)]


def random_headers(rng: random.Random) -> dict[str, str | bytes]:
    headers = {"content-type": rng.choice(["application/json", "text/plain", "", "application/json; charset=latin-1"])}
    if rng.random() < 0.2:
        headers["x-arbstr-policy"] = rng.choice(["", "default", "nope", "x" * 2000, "défaut"]).encode()
    if rng.random() < 0.2:
        headers["x-junk"] = "v" * rng.choice([1, 4000, 16000])
    if rng.random() < 0.1:
        headers.update({f"x-many-{i}": str(i) for i in range(100)})
    if rng.random() < 0.2:
        headers["authorization"] = rng.choice(["Bearer", "Basic xyz", "Bearer " + "k" * 3000, ""])
    return headers


def assert_well_answered(response: httpx.Response, method: str, path: str = "") -> None:
    assert response.status_code < 500, (method, path[:80], response.status_code, response.text[:300])
    if method == "HEAD":
        return
    if response.status_code == 200 and response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]")
        return
    payload = response.json()
    if response.status_code == 200:
        assert payload.keys() & {"choices", "data", "status", "providers", "totals"}
    else:
        assert 400 <= response.status_code < 500
        assert {"message", "type", "code"} <= set(payload["error"])


@pytest.fixture
def target(start_provider, start_proxy):
    provider = start_provider("target", ["gpt-4o"], 0.001, 0.001)
    proxy = start_proxy("serve", provider_toml("target", provider.url, ["gpt-4o"], 1, 1)
                        + '[server]\nmax_body_bytes = 4096\n[routing]\nhealth_interval = 0\n'
                        + '[database]\npath = ":memory:"\n')
    return provider, proxy


def test_thousands_of_hostile_requests(target):
    provider, proxy = target
    rng = random.Random(SEED)
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        for _ in range(2500):
            method, path = rng.choice(METHODS), rng.choice(PATHS)
            body = random_body(rng) if rng.random() < 0.9 else rng.randbytes(rng.choice([5000, 20000]))
            response = http.request(method, path, content=body, headers=random_headers(rng))
            assert_well_answered(response, method, path)
        assert proxy.process.poll() is None
        assert http.post("/v1/chat/completions", json=VALID).json()["choices"]
    assert chat_requests(provider)


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # the client is done: incomplete input must not leave it waiting
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_malformed_http_gets_json_errors_too(target):
    provider, proxy = target
    rng = random.Random(SEED)
    cases = [b"GARBAGE\r\n\r\n", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
             b"POST / HTTP/9.9\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\x00\x00" + rng.randbytes(100)]
    cases += [rng.randbytes(rng.randrange(1, 200)) + b"\r\n\r\n" for _ in range(100)]
    for data in cases:
        received = raw_exchange(proxy.port, data)
        if not received:  # mitmproxy may just close on bytes that are not HTTP at all (a TLS hello)
            continue
        head, _, body = received.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        assert 400 <= status < 500, received[:200]
        assert json.loads(body)["error"]["code"], received[:200]
    assert proxy.process.poll() is None
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        assert http.post("/v1/chat/completions", json=VALID).status_code == 200


def test_body_over_the_limit_is_413(target):
    provider, proxy = target
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        answer = http.post("/v1/chat/completions", json=VALID | {"pad": "x" * 5000})
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"
        chunked = http.post("/v1/chat/completions", content=iter([b"{" + b" " * 3000, b" " * 3000 + b"}"]))
        assert chunked.status_code == 413
    assert not chat_requests(provider)


def test_auth_token_is_required_when_set(start_provider, start_proxy):
    provider = start_provider("p", ["gpt-4o"], 0.001, 0.001)
    proxy = start_proxy("serve", provider_toml("p", provider.url, ["gpt-4o"], 1, 1)
                        + '[server]\nauth_token = "local-secret-token"\n[database]\npath = ":memory:"\n')
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "local-secret-tokenX"},
                        {"authorization": "local-secret-token"}, {"authorization": "Basic local-secret-token"}):
            answer = http.post("/v1/chat/completions", json=VALID, headers=headers)
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
            assert "local-secret-token" not in answer.text
        assert http.get("/v1/models").status_code == 401
        assert http.get("/health").status_code == 200
        for scheme in ("Bearer", "bearer", "BEARER"):
            ok = http.post("/v1/chat/completions", json=VALID, headers={"authorization": f"{scheme} local-secret-token"})
            assert ok.status_code == 200
    # arbstr's own token is the client's Authorization: it never reaches the provider either
    assert all("local-secret-token" not in v for r in provider.requests for _, v in r.headers)
    assert "local-secret-token" not in proxy.log()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_in_logs_at_any_level_nor_in_flows(start_provider, start_proxy, log_format):
    provider_key = "cashuBfake.provider.token.for.the.logs.test"  # not ecash
    client_key = "sk-client-secret-for-logs-000000000"
    provider = start_provider("p", ["gpt-4o"], 0.001, 0.001)
    dead = provider_toml("gone", "http://127.0.0.1:1", ["gpt-4o"], 0.1, 0.1, api_key=provider_key)
    proxy = start_proxy("mitmdump", dead + provider_toml("p", provider.url, ["gpt-4o"], 1, 1, api_key=provider_key)
                        + '[database]\npath = "ledger.db"\n',
                        env=os.environ | {"ARBSTR_LOG": "debug,peewee=debug", "ARBSTR_LOG_FORMAT": log_format},
                        extra_args=("--set", "termlog_verbosity=debug", "--set", "flow_detail=4"))
    with httpx.Client(base_url=proxy.url, timeout=10, headers={"authorization": f"Bearer {client_key}"}) as http:
        assert http.post("/v1/chat/completions", json=VALID).status_code == 200
        assert http.post("/v1/chat/completions", json=VALID | {"stream": True}).status_code == 200
        assert http.post("/v1/chat/completions", json=VALID | {"model": "nope"}).status_code == 404
        for path in ("/health", "/providers", "/v1/models", "/v1/requests", "/v1/stats"):
            answer = http.get(path)
            assert provider_key not in answer.text and provider_key[-20:] not in answer.text
    proxy.stop()
    log = proxy.log()
    assert "/v1/chat/completions" in log and "gone" in log  # the flows and the failed attempt were logged
    for secret in (provider_key, client_key):
        assert secret not in log
    assert provider_key.encode() not in (proxy.log_path.parent / "ledger.db").read_bytes()
    # arbstr's own debug lines and peewee's SQL were there to leak, in the chosen format
    assert "SELECT" in log and "request.settled" in log
    if log_format == "json":
        events = [json.loads(line) for line in log.splitlines() if line.startswith('{"time"')]
        settled = [e for e in events if e["event"] == "request.settled"]
        assert len(settled) == 2 and all(e["provider"] == "p" and len(e["request_id"]) == 32 for e in settled)
        assert any(e["logger"] == "peewee" for e in events)


def random_header_bytes(rng: random.Random, *, name: bool) -> bytes:
    """A header name or value from anywhere in Unicode (UTF-8, lone surrogates too) or raw bytes,
    never CR or LF (those end the line), nor a colon in a name."""
    if rng.random() < 0.5:
        text = "".join(chr(rng.choice([rng.randrange(0x20, 0x80), rng.randrange(0x80, 0x110000)]))
                       for _ in range(rng.randrange(1, 30)))
        data = text.encode("utf-8", "surrogatepass")
    else:
        data = rng.randbytes(rng.randrange(1, 30))
    banned = b"\r\n:" if name else b"\r\n"
    return bytes(b for b in data if b not in banned) or b"x"


def test_header_names_and_values_from_all_of_unicode_and_raw_bytes(target):
    provider, proxy = target
    rng = random.Random(SEED)
    body = json.dumps(VALID).encode()
    for _ in range(150):
        lines = [b"POST /v1/chat/completions HTTP/1.1", b"host: arbstr", b"content-type: application/json",
                 b"content-length: %d" % len(body), b"connection: close"]
        lines += [random_header_bytes(rng, name=True) + b": " + random_header_bytes(rng, name=False)
                  for _ in range(rng.randrange(1, 6))]
        received = raw_exchange(proxy.port, b"\r\n".join(lines) + b"\r\n\r\n" + body)
        if not received:  # mitmproxy may close on a head it cannot parse at all
            continue
        head, _, answer = received.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        assert status == 200 or 400 <= status < 500, received[:300]
        payload = json.loads(answer)
        assert payload["choices"] if status == 200 else payload["error"]["code"], received[:300]
    assert proxy.process.poll() is None
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        assert http.post("/v1/chat/completions", json=VALID).status_code == 200
