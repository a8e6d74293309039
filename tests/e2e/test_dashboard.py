"""GET /dashboard from the real proxy in every mode: one page whose every file arbstr serves itself,
and a sign-in that lets a browser read the dashboard, never spend."""

from __future__ import annotations

import re

import httpx
import pytest

from arbstr.dashboard import ASSETS
from conftest import provider_toml
from e2e.conftest import BIN, KINDS

TOKEN = "dashboard-token-0123456789"
HI = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("kind", KINDS)
def test_the_page_and_every_file_it_loads_come_from_arbstr(kind, start_provider, start_proxy):
    provider = start_provider("only", ["gpt-4o"], 0.001, 0.001)
    proxy = start_proxy(kind, provider_toml("only", provider.url, ["gpt-4o"], 1, 1))
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        page = http.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        loaded = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert "/dashboard/uPlot.iife.min.js" in loaded and "/dashboard/dashboard.js" in loaded
        for path in loaded:
            assert path.startswith("/dashboard/") or path.startswith("data:"), path
            if path.startswith("/"):
                assert http.get(path).status_code == 200
        for path in ASSETS:
            text = http.get(path).text
            assert not re.search(r"""(?:src|href|url)\s*[=(]\s*["']?(?:https?:)?//""", text), path
        assert "MIT" in http.get("/dashboard/uPlot.LICENSE").text


def test_mock_mode_serves_the_dashboard(start_process):
    mock = start_process([str(BIN / "arbstr"), "serve", "--mock", "--listen", "127.0.0.1:0", "--mock-latency", "0"],
                         name="mock")
    with httpx.Client(base_url=f"http://127.0.0.1:{mock.port}", timeout=10) as http:
        assert "<title>arbstr" in http.get("/dashboard").text
        assert http.get("/dashboard/dashboard.js").headers["content-type"].startswith("text/javascript")


@pytest.mark.parametrize("kind", KINDS)
def test_a_token_signs_a_browser_in_to_read_never_to_spend(kind, start_provider, start_proxy):
    provider = start_provider("only", ["gpt-4o"], 0.001, 0.001)
    proxy = start_proxy(kind, provider_toml("only", provider.url, ["gpt-4o"], 1, 1)
                        + f'[server]\nauth_token = "{TOKEN}"\n[database]\npath = ":memory:"\n')
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        asked = http.get("/dashboard")
        assert asked.status_code == 200 and '<form method="post" action="/dashboard">' in asked.text
        assert "dashboard.js" not in asked.text
        assert http.get("/dashboard/dashboard.css").status_code == 200  # the sign-in page needs it
        assert http.get("/v1/stats").status_code == 401
        wrong = http.post("/dashboard", data={"token": "guess"})
        assert wrong.status_code == 401 and "not this arbstr's token" in wrong.text and "set-cookie" not in wrong.headers
        signed = http.post("/dashboard", data={"token": TOKEN})
        assert signed.status_code == 303 and signed.headers["location"] == "/dashboard"
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        # httpx keeps the cookie: the page and the read-only API open, spending does not
        assert http.get("/dashboard").status_code == 200
        assert http.get("/v1/stats?range=1h").status_code == 200
        assert http.get("/metrics").status_code == 200
        assert http.post("/v1/chat/completions", json=HI).status_code == 401
        assert not provider.requests or all(r.path.endswith("/models") for r in provider.requests)
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        link = http.get(f"/dashboard?token={TOKEN}")
        assert link.status_code == 303 and "arbstr_session=" in link.headers["set-cookie"]
        assert http.get("/dashboard").status_code == 200
    with httpx.Client(base_url=proxy.url, timeout=10, cookies={"arbstr_session": "forged"}) as http:
        assert http.get("/v1/stats").status_code == 401
    proxy.stop()
    assert TOKEN not in proxy.log()


def test_balances_are_what_each_node_says_its_key_holds(start_provider, start_proxy):
    live = start_provider("live", ["gpt-4o"], 0.001, 0.001)
    key = "sk-live-key-for-balances-0123456789"
    proxy = start_proxy("serve", provider_toml("live", live.url, ["gpt-4o"], 1, 1, api_key=key)
                        + provider_toml("gone", "http://127.0.0.1:1", ["gpt-4o"], 1, 1)
                        + '[database]\npath = ":memory:"\n')
    with httpx.Client(base_url=proxy.url, timeout=20) as http:
        answer = http.get("/v1/balances")
    assert answer.status_code == 200 and key not in answer.text
    found = {p["name"]: p for p in answer.json()["providers"]}
    assert found["live"]["balance_sats"] == "100000" and found["live"]["reserved_sats"] == "0"
    assert found["live"]["errors"] == [] and found["live"]["keys"] == 1
    assert found["gone"]["balance_sats"] is None and "unreachable" in found["gone"]["errors"][0]
    assert answer.json()["wallet"] is None
    asked = [r for r in live.requests if r.path.endswith("/balance/info")]
    assert len(asked) == 1 and {k.lower(): v for k, v in asked[0].headers}["authorization"] == f"Bearer {key}"
