"""mitmweb with the addon: every routed flow says provider, policy, estimated and actual cost and
attempts, read back through mitmweb's own HTTP API."""

from __future__ import annotations

import re

import httpx

from conftest import provider_toml
from e2e.conftest import free_port, start_mitmweb

WEB_TOKEN = "mitmweb-test-token"
KEY = "cashuBfake.mitmweb.test.token"  # not ecash: a made-up string


def test_flows_in_mitmweb_carry_arbstrs_comments(start_provider, start_process, tmp_path):
    good = start_provider("good", ["gpt-4o"], 0.001, 0.002)
    config = tmp_path / "config.toml"
    config.write_text(provider_toml("dead", "http://127.0.0.1:1", ["gpt-4o"], 0.1, 0.1, api_key=KEY)
                      + provider_toml("good", good.url, ["gpt-4o"], 1, 2, api_key=KEY)
                      + '[routing]\nhealth_interval = 0\n[database]\npath = ":memory:"\n')
    web_port = free_port()
    mitmweb = start_mitmweb(start_process, tmp_path, config, web_port, WEB_TOKEN)
    proxy = f"http://127.0.0.1:{mitmweb.port}"
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10) as http:
        assert http.post(f"{proxy}/v1/chat/completions", json=body).status_code == 200
        assert http.post(f"{proxy}/v1/chat/completions", json=body | {"stream": True}).status_code == 200
        assert http.post(f"{proxy}/v1/chat/completions", json=body | {"model": "gpt-9"}).status_code == 404
        assert http.get(f"{proxy}/v1/models").status_code == 200
        flows = http.get(f"http://127.0.0.1:{web_port}/flows", headers={"authorization": f"Bearer {WEB_TOKEN}"}).json()
    assert len(flows) == 4
    whole, stream, unknown, models = flows
    for routed in (whole, stream):
        assert re.fullmatch(r"arbstr: provider=good policy=default model=gpt-4o estimated=[0-9.]+ sats "
                            r"at [0-9.]+/[0-9.]+ per 1k \((live|fallback)\) "
                            r"cost=[0-9.]+ sats( after failing: dead: connection refused)?", routed["comment"])
        assert routed["response"]["status_code"] == 200
    # the first request met the dead provider first; its breaker then kept it out of the way
    assert whole["comment"].endswith("after failing: dead: connection refused")
    assert whole["marked"] == "🔄"  # mitmweb shows the :arrows_counterclockwise: mark as its emoji
    assert "after failing" not in stream["comment"] and not stream["marked"]
    assert unknown["comment"].startswith("arbstr: model_not_found") and unknown["marked"] not in ("", "🔄")
    assert models["comment"] == "arbstr: local /v1/models" and not models["marked"]
    assert KEY not in str(flows)
