"""The real proxy, both ways of running it, in front of Routstr-like providers, with the openai client."""

from __future__ import annotations

import json
import time

import openai
import pytest

from conftest import chat_requests, provider_toml
from e2e.conftest import CLIENT_KEY, KINDS

pytestmark = pytest.mark.parametrize("kind", KINDS)

CHEAP_KEY = "sk-cheap-provider-key-0123456789"
PRICEY_KEY = "cashuBpricey0provider0token0abcdefghijklmnop"


@pytest.fixture
def fleet(start_provider):
    """Two providers of gpt-4o: `cheap` at half the price of `pricey`; `pricey` alone has llama3:8b."""
    cheap = start_provider("cheap", ["gpt-4o"], 0.0025, 0.01, 0.001)
    pricey = start_provider("pricey", ["gpt-4o", "llama3:8b"], 0.005, 0.02, 0.001)
    config = (provider_toml("pricey", pricey.url, ["gpt-4o", "llama3:8b"], 5, 20, 0.001, api_key=PRICEY_KEY)
              + provider_toml("cheap", cheap.url.removesuffix("/v1"), ["gpt-4o"], 2.5, 10, 0.001, api_key=CHEAP_KEY)
              + """
[policies]
default_strategy = "cheapest"

[[policies.rules]]
name = "local"
allowed_models = ["llama3:8b"]
keywords = ["offline"]
""")
    return cheap, pricey, config


def assert_no_client_secret(provider) -> None:
    for received in provider.requests:  # health probes included
        for name, value in received.headers:
            assert CLIENT_KEY not in value, f"client key leaked in {name}"
            assert not name.startswith("x-arbstr"), f"{name} reached the provider"
            assert name not in ("cookie", "api-key")


def test_non_streaming_goes_to_the_cheapest(kind, fleet, start_proxy):
    cheap, pricey, config = fleet
    proxy = start_proxy(kind, config)
    raw = proxy.client().chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi there"}],
        extra_headers={"cookie": "session=abc", "api-key": CLIENT_KEY})
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from cheap"
    assert raw.headers["x-arbstr-provider"] == "cheap"
    assert raw.headers["x-arbstr-policy"] == "default"
    assert len(raw.headers["x-arbstr-request-id"]) == 32
    assert raw.headers["x-routstr-cost-msats"]  # the provider's own headers pass through
    assert json.loads(raw.content)["arbstr_provider"] == "cheap"
    assert completion.usage.completion_tokens == 3
    assert len(chat_requests(cheap)) == 1 and not chat_requests(pricey)
    sent = chat_requests(cheap)[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.header("authorization") == f"Bearer {CHEAP_KEY}"
    assert sent.json()["messages"] == [{"role": "user", "content": "hi there"}]
    assert_no_client_secret(cheap)


def test_streaming_passes_through_as_it_arrives(kind, fleet, start_proxy):
    cheap, pricey, config = fleet
    cheap.reply = "one two three four five"
    cheap.chunk_delay = 0.15
    proxy = start_proxy(kind, config)
    raw = proxy.client().chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "count"}], stream=True)
    assert raw.headers["x-arbstr-provider"] == "cheap"
    assert raw.headers["x-arbstr-policy"] == "default"
    arrivals, text, usage = [], "", None
    for chunk in raw.parse():
        arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert text.split() == ["one", "two", "three", "four", "five"]
    assert usage is not None and usage.completion_tokens == 5
    # Five chunks written 0.15 s apart: a buffered answer would arrive all at once.
    assert arrivals[-1] - arrivals[0] >= 0.5
    assert chat_requests(cheap)[0].header("authorization") == f"Bearer {CHEAP_KEY}"
    assert_no_client_secret(cheap)
    assert not chat_requests(pricey)


def test_policy_by_header_and_by_keyword(kind, fleet, start_proxy):
    cheap, pricey, config = fleet
    proxy = start_proxy(kind, config)
    client = proxy.client()
    raw = client.chat.completions.with_raw_response.create(
        model="llama3:8b", messages=[{"role": "user", "content": "works Offline?"}])
    assert (raw.headers["x-arbstr-policy"], raw.headers["x-arbstr-provider"]) == ("local", "pricey")
    raw = client.chat.completions.with_raw_response.create(
        model="llama3:8b", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Arbstr-Policy": "local"})
    assert raw.headers["x-arbstr-policy"] == "local"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                       extra_headers={"X-Arbstr-Policy": "local"})
    assert err.value.code == "model_not_allowed"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                       extra_headers={"X-Arbstr-Policy": "turbo"})
    assert err.value.code == "unknown_policy" and "default, local" in err.value.message


def test_errors_are_openai_shaped(kind, fleet, start_proxy):
    cheap, pricey, config = fleet
    proxy = start_proxy(kind, config)
    with pytest.raises(openai.NotFoundError) as err:
        proxy.client().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found" and "gpt-9" in err.value.message
    with proxy.http() as http:
        for body, code in [(b"{not json", "invalid_json"), (b"[]", "invalid_body"),
                           (b'{"messages": [{"role": "user", "content": "x"}]}', "missing_model"),
                           (b'{"model": "gpt-4o"}', "missing_messages")]:
            answer = http.post("/v1/chat/completions", content=body)
            assert answer.status_code == 400, body
            assert answer.json()["error"]["code"] == code
            assert set(answer.json()["error"]) >= {"message", "type", "code"}
        answer = http.get("/v1/chat/completions")
        assert answer.status_code == 405 and answer.json()["error"]["code"] == "method_not_allowed"
        assert http.get("/v2/anything").status_code == 404
    assert not chat_requests(cheap) and not chat_requests(pricey)


def test_upstream_failure_is_502_naming_the_provider(kind, fleet, start_proxy):
    cheap, pricey, config = fleet
    pricey.stop()
    cheap.stop()
    proxy = start_proxy(kind, config)
    with proxy.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "llama3:8b", "messages": [{"role": "user", "content": "x"}]})
    assert answer.status_code == 502
    error = answer.json()["error"]
    assert error["code"] == "upstream_error" and "pricey" in error["message"]
    assert PRICEY_KEY not in answer.text


def test_local_endpoints_answer_without_forwarding(kind, fleet, start_proxy):
    cheap, pricey, config = fleet
    proxy = start_proxy(kind, config)
    models = proxy.client().models.list()
    assert sorted(m.id for m in models.data) == ["gpt-4o", "llama3:8b"]
    with proxy.http() as http:
        listed = http.get("/v1/models").json()
        gpt = next(m for m in listed["data"] if m["id"] == "gpt-4o")
        assert [p["name"] for p in gpt["providers"]] == ["cheap", "pricey"]
        assert gpt["providers"][0]["output_rate"] == 10
        assert http.get("/health").json()["status"] == "ok"
        answer = http.get("/providers")
        assert CHEAP_KEY not in answer.text and PRICEY_KEY not in answer.text
        assert {p["name"]: p["api_key"] for p in answer.json()["providers"]} == {
            "pricey": "cashu…mnop", "cheap": "sk-…6789"}
    assert not chat_requests(cheap) and not chat_requests(pricey)
    assert CHEAP_KEY not in proxy.log() and PRICEY_KEY not in proxy.log()

