"""The running proxy routes by the prices each node lists now, read again every `price_refresh` seconds."""

from __future__ import annotations

import time

import pytest

from arbstr.mock import MockModel

from conftest import chat_requests


def live_provider(name: str, url: str) -> str:
    """A provider table with no models and no rates: everything comes from its /v1/models."""
    return f'[[providers]]\nname = "{name}"\nurl = "{url}"\napi_key = "sk-{name}-0123456789abcdef"\n'


def ask(proxy, model: str) -> str:
    answer = proxy.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    return answer.choices[0].message.content.removeprefix("Hello from ")


def wait_for(proxy, reads: int) -> dict:
    """Wait for `reads` more complete price reads than now; /health then."""
    return proxy.wait_for_prices(proxy.wait_for_prices()["price_reads"] + reads)


@pytest.mark.parametrize("kind", ["serve", "mitmdump"])
def test_routing_follows_the_nodes_prices(kind, start_provider, start_proxy):
    a = start_provider("a", ["x", "y"], 0.001, 0.001)
    b = start_provider("b", ["x", "y"], 0.002, 0.002)
    proxy = start_proxy(kind, live_provider("a", a.url) + live_provider("b", b.url)
                        + "[routing]\nprice_refresh = 0.2\nhealth_interval = 0\n")
    health = proxy.wait_for_prices()
    assert [p["prices"]["source"] for p in health["providers"]] == ["live", "live"]
    assert ask(proxy, "x") == "a"

    a.set_model(MockModel("x", 0.003, 0.003))  # dearer than b now, within the jump limit
    a.set_model(MockModel("y", 0.5, 0.5))  # a 500x jump: held back, not adopted
    b.set_model(MockModel("y", 0.002, 0.002, enabled=False))
    b.set_model(MockModel("z", 0.002, 0.002))
    health = wait_for(proxy, 2)
    assert ask(proxy, "x") == "b"
    assert ask(proxy, "z") == "b"
    a_prices = health["providers"][0]["prices"]
    assert [h["model"] for h in a_prices["held"]] == ["y"] and a_prices["held"][0]["factor"] == 500
    with proxy.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "y", "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
        listed = {m["id"]: m["providers"] for m in http.get("/v1/models").json()["data"]}
    assert sorted(listed) == ["x", "z"]
    assert [(p["name"], p["input_rate"], p["source"]) for p in listed["x"]] == [("b", 2, "live"), ("a", 3, "live")]
    assert "held back" in proxy.log() and "500.0x" in proxy.log()
    assert not [r for r in chat_requests(a) + chat_requests(b) if r.json()["model"] == "y"]


def test_a_node_that_goes_away_falls_back_to_configured_prices(start_provider, start_proxy):
    a = start_provider("a", ["x"], 0.001, 0.001)
    proxy = start_proxy("serve", live_provider("a", a.url) + 'models = ["x"]\ninput_rate = 9\noutput_rate = 9\n'
                        + "[routing]\nprice_refresh = 0.2\nhealth_interval = 0\n")
    assert proxy.wait_for_prices()["providers"][0]["prices"]["source"] == "live"
    a.stop()
    deadline = time.monotonic() + 10
    while (prices := wait_for(proxy, 1)["providers"][0]["prices"])["source"] != "fallback":
        assert time.monotonic() < deadline, prices
    assert prices["stale"] and prices["error"]
    assert "cannot read its prices" in proxy.log()
