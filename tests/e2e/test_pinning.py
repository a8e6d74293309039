"""Pinning through the real proxy: a client or a policy restricts the providers, fallback can be
turned off so a pinned provider's failure reaches the client as is, and max_price_ratio keeps a
dear provider from ever standing in for a cheap one."""

from __future__ import annotations

import pytest

from conftest import chat_requests, provider_toml

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "pin me"}]}


@pytest.fixture
def fleet(start_provider, start_proxy):
    """flaky (cheapest, answers 503), good, dear (ten times good's price)."""
    flaky = start_provider("flaky", ["gpt-4o"], 0.001, 0.001, fail_status=503)
    good = start_provider("good", ["gpt-4o"], 0.002, 0.002)
    dear = start_provider("dear", ["gpt-4o"], 0.02, 0.02)
    proxy = start_proxy("serve", provider_toml("flaky", flaky.url, ["gpt-4o"], 1, 1)
                        + provider_toml("good", good.url, ["gpt-4o"], 2, 2)
                        + provider_toml("dear", dear.url, ["gpt-4o"], 20, 20)
                        + '[routing]\nhealth_interval = 0\nfailure_threshold = 100\n[database]\npath = ":memory:"\n'
                        + '[[policies.rules]]\nname = "strict"\nproviders = ["flaky", "good"]\nallow_fallback = false\n'
                        + '[[policies.rules]]\nname = "thrifty"\nproviders = ["flaky", "dear"]\nmax_price_ratio = 3\n')
    return proxy, flaky, good, dear


def test_a_pin_restricts_the_candidates(fleet):
    proxy, flaky, good, dear = fleet
    with proxy.http() as http:
        answer = http.post("/v1/chat/completions", json=BODY, headers={"x-arbstr-provider": "dear"})
        assert answer.status_code == 200 and answer.headers["x-arbstr-provider"] == "dear"
        assert answer.headers["x-arbstr-attempts"] == "none"
        # with fallback (the default), the next pinned provider serves when the first fails
        answer = http.post("/v1/chat/completions", json=BODY, headers={"x-arbstr-provider": "flaky,dear"})
        assert answer.headers["x-arbstr-provider"] == "dear" and answer.headers["x-arbstr-attempts"] == "flaky=status 503"
        unknown = http.post("/v1/chat/completions", json=BODY, headers={"x-arbstr-provider": "nobody"})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_provider"
    assert not chat_requests(good)
    assert all("x-arbstr-provider" not in dict(r.headers) for r in chat_requests(dear))


@pytest.mark.parametrize("stream", [False, True])
def test_without_fallback_the_pinned_failure_is_the_answer(fleet, stream):
    proxy, flaky, good, dear = fleet
    with proxy.http() as http:
        answer = http.post("/v1/chat/completions", json={**BODY, "stream": stream},
                           headers={"x-arbstr-provider": "flaky,good", "x-arbstr-fallback": "none"})
        by_policy = http.post("/v1/chat/completions", json=BODY, headers={"x-arbstr-policy": "strict"})
    assert answer.status_code == 503 and answer.headers["x-arbstr-provider"] == "flaky"
    assert answer.json()["error"]["code"] == "cashu_mint_unreachable"  # the provider's own body, as is
    assert by_policy.status_code == 503 and by_policy.json()["error"] == answer.json()["error"]
    assert not chat_requests(good)


def test_max_price_ratio_fails_rather_than_pay_the_dear_one(fleet):
    proxy, flaky, good, dear = fleet
    with proxy.http() as http:
        answer = http.post("/v1/chat/completions", json=BODY, headers={"x-arbstr-policy": "thrifty"})
    error = answer.json()["error"]
    assert answer.status_code == 502 and error["code"] == "upstream_error"
    assert [a["provider"] for a in error["attempts"]] == ["flaky"]
    assert error["not_tried"][0]["provider"] == "dear" and "max_price_ratio" in error["not_tried"][0]["reason"]
    assert "dear: estimated" in error["message"]
    assert not chat_requests(dear)
