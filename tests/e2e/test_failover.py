"""A request succeeds while any eligible provider is up: dead, failing, broke and hanging
providers in front of one good one, streaming and not, through the real proxy."""

from __future__ import annotations

import socketserver
import threading
import time

import pytest

from conftest import chat_requests, provider_toml
from e2e.conftest import KINDS, free_port


@pytest.fixture
def gauntlet(start_provider):
    """Cheapest first: dead, 503, 402, hanging; the good one is the dearest."""
    failing = start_provider("failing", ["gpt-4o"], 0.001, 0.001, fail_status=503)
    broke = start_provider("broke", ["gpt-4o"], 0.001, 0.002)
    broke.fail_status = 402
    hanging = start_provider("hanging", ["gpt-4o"], 0.001, 0.003)
    hanging.hang = True
    good = start_provider("good", ["gpt-4o"], 0.01, 0.04)
    config = (provider_toml("dead", f"http://127.0.0.1:{free_port()}", ["gpt-4o"], 0.5, 0.5)
              + provider_toml("failing", failing.url, ["gpt-4o"], 1, 1)
              + provider_toml("broke", broke.url, ["gpt-4o"], 1, 2)
              + provider_toml("hanging", hanging.url, ["gpt-4o"], 1, 3)
              + provider_toml("good", good.url, ["gpt-4o"], 10, 40)
              + '[routing]\nheader_timeout = 0.5\nfailure_threshold = 3\nhealth_interval = 0\n'
              + '[database]\npath = ":memory:"\n')
    return {"failing": failing, "broke": broke, "hanging": hanging, "good": good}, config


@pytest.mark.parametrize("kind", KINDS)
def test_every_request_is_answered_by_the_good_provider(kind, gauntlet, start_proxy):
    providers, config = gauntlet
    proxy = start_proxy(kind, config)
    client = proxy.client()
    attempts = []
    for i in range(12):
        messages = [{"role": "user", "content": f"request {i}"}]
        if i % 2:
            raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        else:
            raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
            text = raw.parse().choices[0].message.content
        assert raw.headers["x-arbstr-provider"] == "good"
        assert text.strip() == "Hello from good"
        attempts.append(raw.headers["x-arbstr-attempts"])
    assert attempts[0] == "dead=refused; failing=status 503; broke=out_of_funds 402; hanging=header_timeout"
    # the dead one (refused: at once) and the broke one (402) are passed over from the second request;
    # the failing and hanging ones until their breakers open after three failures each
    assert "dead" not in attempts[1] and "broke" not in attempts[1]
    assert attempts[3:] == ["none"] * 9
    assert len(chat_requests(providers["good"])) == 12
    assert len(chat_requests(providers["failing"])) == 3

    with proxy.http() as http:
        health = http.get("/health")
        states = {p["name"]: p for p in health.json()["providers"]}
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert states["dead"]["state"] == "open" and states["dead"]["last_error"] == "dead: connection refused"
    assert states["broke"]["state"] == "out_of_funds"
    assert states["failing"]["state"] == "degraded" and "503" in states["failing"]["last_error"]
    assert states["hanging"]["state"] == "degraded"
    assert states["good"]["state"] == "up" and states["good"]["last_success_at"].endswith("Z")


def test_every_provider_failing_is_one_json_error_listing_each(gauntlet, start_proxy):
    providers, config = gauntlet
    providers["good"].fail_status = 500
    proxy = start_proxy("serve", config)
    with proxy.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
        assert answer.status_code == 502
        error = answer.json()["error"]
        assert error["code"] == "upstream_error"
        assert [a["provider"] for a in error["attempts"]] == ["dead", "failing", "broke", "hanging", "good"]
        assert [a["outcome"] for a in error["attempts"]] == ["refused", "status", "out_of_funds", "header_timeout", "status"]


def test_a_request_caused_4xx_is_returned_as_is(start_provider, start_proxy):
    strict = start_provider("strict", ["gpt-4o"], 0.001, 0.001, fail_status=422)
    spare = start_provider("spare", ["gpt-4o"], 0.01, 0.01)
    proxy = start_proxy("serve", provider_toml("strict", strict.url, ["gpt-4o"], 1, 1)
                        + provider_toml("spare", spare.url, ["gpt-4o"], 10, 10) + '[database]\npath = ":memory:"\n')
    with proxy.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    assert answer.status_code == 422 and answer.headers["x-arbstr-provider"] == "strict"
    assert answer.json()["error"]["code"] == "mock_failure"
    assert not chat_requests(spare)


def test_a_provider_that_does_not_serve_the_model_fails_over_and_is_dropped(start_provider, start_proxy):
    # A real node answers 400 invalid_model for a model it does not serve. This one lists gpt-4o in its
    # /v1/models all the same (a model it stops listing is never sent to it; see test_live_prices).
    wrong = start_provider("wrong", ["gpt-4o"], 0.001, 0.001, fail_status=400)
    right = start_provider("right", ["gpt-4o"], 0.01, 0.01)
    proxy = start_proxy("serve", provider_toml("wrong", wrong.url, ["gpt-4o"], 1, 1)
                        + provider_toml("right", right.url, ["gpt-4o"], 10, 10)
                        + '[routing]\nhealth_interval = 0\n[database]\npath = ":memory:"\n')
    proxy.wait_for_prices()  # a read brings the model back: the drop lasts until the next one
    client = proxy.client()
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        assert raw.headers["x-arbstr-provider"] == "right"
    assert raw.headers["x-arbstr-attempts"] == "none"  # dropped after the first 400
    assert len(chat_requests(wrong)) == 1 and len(chat_requests(right)) == 3


def test_background_probes_find_a_dead_provider_before_any_request(start_provider, start_proxy):
    good = start_provider("good", ["gpt-4o"], 0.01, 0.01)
    proxy = start_proxy("serve", provider_toml("dead", f"http://127.0.0.1:{free_port()}",
                                               ["gpt-4o"], 1, 1)
                        + provider_toml("good", good.url, ["gpt-4o"], 10, 10)
                        + '[routing]\nhealth_interval = 0.2\n[database]\npath = ":memory:"\n')
    with proxy.http() as http:
        for _ in range(100):
            states = {p["name"]: p["state"] for p in http.get("/health").json()["providers"]}
            if states == {"dead": "open", "good": "up"}:
                break
            time.sleep(0.05)
        assert states == {"dead": "open", "good": "up"}
        answer = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
        assert answer.headers["x-arbstr-attempts"] == "none" and answer.headers["x-arbstr-provider"] == "good"


def test_health_is_503_when_no_provider_can_serve(start_proxy):
    proxy = start_proxy("serve", provider_toml("dead", f"http://127.0.0.1:{free_port()}",
                                               ["gpt-4o"], 1, 1)
                        + '[routing]\nhealth_interval = 0\n[database]\npath = ":memory:"\n')
    with proxy.http() as http:
        assert http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}).status_code == 502
        health = http.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "down"


@pytest.fixture
def not_tls():
    """A server that answers a TLS handshake with plain text and hangs up."""
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\nthis is not TLS")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("stream", [False, True])
def test_429_408_500_and_tls_failures_fail_over(stream, not_tls, start_provider, start_proxy):
    limited = start_provider("limited", ["gpt-4o"], 0.001, 0.001, fail_status=429)
    slow = start_provider("slow", ["gpt-4o"], 0.001, 0.001, fail_status=408)
    broken = start_provider("broken", ["gpt-4o"], 0.001, 0.001, fail_status=500)
    good = start_provider("good", ["gpt-4o"], 0.01, 0.01)
    tls = provider_toml("tls", not_tls, ["gpt-4o"], 0.1, 0.1)
    proxy = start_proxy("serve", tls + provider_toml("limited", limited.url, ["gpt-4o"], 1, 1)
                        + provider_toml("slow", slow.url, ["gpt-4o"], 2, 2)
                        + provider_toml("broken", broken.url, ["gpt-4o"], 3, 3)
                        + provider_toml("good", good.url, ["gpt-4o"], 10, 10)
                        + '[routing]\nhealth_interval = 0\n[database]\npath = ":memory:"\n')
    raw = proxy.client().chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=stream)
    assert raw.headers["x-arbstr-provider"] == "good"
    assert raw.headers["x-arbstr-attempts"] == "tls=connect; limited=status 429; slow=status 408; broken=status 500"
