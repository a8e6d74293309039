"""A provider that quotes the credential it was paid with: the quote reaches no client, no /health,
no log, no ledger row and no mitmweb flow."""

from __future__ import annotations

import time

import httpx
import pytest

from conftest import provider_toml
from e2e.conftest import free_port, start_mitmweb

CASHU_KEY = "cashuBleakyProviderToken0123456789abcdef"  # not ecash: made up
PLAIN_KEY = "plain-provider-key-not-shaped-like-any-key"
AUTH_TOKEN = "local-owner-token-0123456789"
WEB_TOKEN = "mitmweb-redaction-token"
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
SECRETS = (CASHU_KEY, PLAIN_KEY, AUTH_TOKEN)


def assert_no_secret(text: str | bytes, where: str) -> None:
    for secret in SECRETS:
        for part in (secret, secret[-16:]):
            needle = part.encode() if isinstance(text, bytes) else part
            assert needle not in text, f"{part!r} leaked into {where}"


@pytest.fixture
def leaky_providers(start_provider):
    """`leaky` answers 503 and `blunt` 422 (passed on to the client), both quoting the credential
    they received."""
    leaky = start_provider("leaky", ["gpt-4o", "only-leaky"], 0.001, 0.001, fail_status=503)
    blunt = start_provider("blunt", ["gpt-4o"], 0.002, 0.002, fail_status=422)
    leaky.echo_key = blunt.echo_key = True
    config = (provider_toml("leaky", leaky.url, ["gpt-4o", "only-leaky"], 1, 1, api_key=CASHU_KEY)
              + provider_toml("blunt", blunt.url, ["gpt-4o"], 2, 2, api_key=PLAIN_KEY)
              + f'[server]\nauth_token = "{AUTH_TOKEN}"\n[routing]\nhealth_interval = 0\n'
              + '[database]\npath = "ledger.db"\nflush_interval = 0\n')
    return leaky, blunt, config


@pytest.mark.parametrize("kind", ["mitmdump", "mitmweb"])
def test_a_provider_quoting_its_key_leaks_nothing(kind, leaky_providers, start_proxy, start_process, tmp_path):
    leaky, blunt, config = leaky_providers
    web_port = free_port()
    if kind == "mitmweb":
        (tmp_path / "config.toml").write_text(config)
        proxy = start_mitmweb(start_process, tmp_path, tmp_path / "config.toml", web_port, WEB_TOKEN)
        url = f"http://127.0.0.1:{proxy.port}"
    else:
        proxy = start_proxy("mitmdump", config, extra_args=("--set", "termlog_verbosity=debug",
                                                            "--set", "flow_detail=4"))
        url = proxy.url
    owner = {"authorization": f"Bearer {AUTH_TOKEN}"}
    with httpx.Client(base_url=url, timeout=10) as http:
        # leaky (cheapest) fails with 503, then blunt's 422 is the answer
        passed_on = http.post("/v1/chat/completions", json=BODY, headers=owner)
        # only leaky serves this model: every attempt failed, a 502 that describes each
        all_failed = http.post("/v1/chat/completions", json=BODY | {"model": "only-leaky"}, headers=owner)
        stranger_health = http.get("/health")
        owner_health = http.get("/health", headers=owner)
        assert all(leaky.requests) and all(blunt.requests)  # both providers really received their key
        assert any(CASHU_KEY in (r.header("authorization") or "") for r in leaky.requests)

        assert passed_on.status_code == 422 and all_failed.status_code == 502
        for answer in (passed_on, all_failed):
            assert_no_secret(answer.text, "a client's answer")
            assert_no_secret(str(answer.headers), "a client's answer headers")
        assert "[REDACTED]" in passed_on.text and passed_on.headers["x-debug-credential"] == "Bearer [REDACTED]"
        attempt = all_failed.json()["error"]["attempts"][0]
        assert attempt["provider"] == "leaky" and "[REDACTED]" in attempt["detail"]

        assert stranger_health.status_code == owner_health.status_code
        strangers = {p["name"]: p for p in stranger_health.json()["providers"]}
        owners = {p["name"]: p for p in owner_health.json()["providers"]}
        assert strangers["leaky"]["state"] == owners["leaky"]["state"]
        assert strangers["leaky"]["last_error"] is None and strangers["leaky"]["last_error_at"]
        assert "[REDACTED]" in owners["leaky"]["last_error"] and "Cashu mint unreachable" in owners["leaky"]["last_error"]
        assert_no_secret(owner_health.text, "/health")

        if kind == "mitmweb":
            flows = http.get(f"http://127.0.0.1:{web_port}/flows",
                             headers={"authorization": f"Bearer {WEB_TOKEN}"}).json()
            routed = [f for f in flows if f["request"]["path"].endswith("/chat/completions")]
            clients = [f for f in routed if f["marked"] != "❌"]
            attempts = [f for f in routed if f["marked"] == "❌"]  # each failed attempt is a flow of its own
            assert len(clients) == 2 and all("leaky" in f["comment"] for f in clients)
            assert len(attempts) == 2 and all(f["comment"].startswith("leaky 503: attempt 1 ") for f in attempts)
            assert "[REDACTED]" in "".join(f["comment"] for f in attempts)
            assert_no_secret(str(flows), "mitmweb's flows")
            for flow in routed:
                content = http.get(f"http://127.0.0.1:{web_port}/flows/{flow['id']}/response/content.data",
                                   headers={"authorization": f"Bearer {WEB_TOKEN}"})
                assert content.status_code == 200 and content.content
                assert_no_secret(content.content, "a flow's response in mitmweb")
    ledger = tmp_path / "ledger.db"
    deadline = time.monotonic() + 10
    while b"only-leaky" not in ledger.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    proxy.stop()
    assert b"only-leaky" in ledger.read_bytes()  # the rows were written
    assert_no_secret(ledger.read_bytes(), "the ledger")
    assert_no_secret(proxy.log(), "the log")
