"""HTTP/2 clients with prior knowledge (`curl --http2-prior-knowledge`, httpx with http2 and no
HTTP/1, on a plain http:// URL) are served HTTP/2: completions, streams and arbstr's own endpoints."""

from __future__ import annotations

import httpx
import pytest

from conftest import chat_requests, provider_toml
from e2e.conftest import CLIENT_KEY, KINDS
from e2e.test_ledger import wait_for_rows

MESSAGES = [{"role": "user", "content": "over http/2"}]


@pytest.mark.parametrize("kind", KINDS)
def test_prior_knowledge_http2_clients_get_completions_and_streams(kind, start_provider, start_proxy):
    provider = start_provider("p", ["gpt-4o"], 0.001, 0.001)
    proxy = start_proxy(kind, provider_toml("p", provider.url, ["gpt-4o"], 1, 1)
                        + '[routing]\nhealth_interval = 0\n[database]\npath = "ledger.db"\n')
    with httpx.Client(http1=False, http2=True, timeout=20, headers={"authorization": f"Bearer {CLIENT_KEY}"}) as h2:
        client = proxy.client(http_client=h2)
        whole = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
        assert whole.http_response.http_version == "HTTP/2"
        assert whole.headers["x-arbstr-provider"] == "p" and whole.parse().choices[0].message.content
        chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage.completion_tokens > 0
        health = h2.get(f"{proxy.url}/health")
        assert health.http_version == "HTTP/2" and health.json()["providers"][0]["name"] == "p"
        # HTTP/2 heads are held to the same limits as HTTP/1 ones
        many = h2.post(f"{proxy.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES},
                       headers={f"x-filler-{i}": "v" for i in range(300)})
        assert many.status_code == 431 and many.json()["error"]["code"] == "request_headers_too_large"
    rows = wait_for_rows(proxy, 2)
    assert sorted(r["streaming"] for r in rows) == [False, True]
    assert all(r["provider"] == "p" and r["success"] and r["cost_reported"] for r in rows)
    # the provider was asked over HTTP/1.1, without the client's own key
    assert len(chat_requests(provider)) == 2
    assert all(CLIENT_KEY not in value for r in provider.requests for _, value in r.headers)
