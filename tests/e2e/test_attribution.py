"""Every request through the real proxy is attributed to an app, from each source, and spend is
reported per app by /v1/stats and `arbstr stats`."""

from __future__ import annotations

import json
import subprocess

import httpx

from conftest import chat_requests, provider_toml
from e2e.conftest import BIN, CLIENT_KEY
from e2e.test_ledger import wait_for_rows

TOKENS = (f'[server]\nauth_token = "{CLIENT_KEY}"\n[[server.tokens]]\nname = "ci-bot"\ntoken = "tok-ci-bot-0123456789"\n'
          '[[server.tokens]]\nname = "research"\ntoken = "tok-research-0123456789"\n')
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "who am I"}]}


def test_each_source_names_the_app_and_stats_group_by_it(start_provider, start_proxy, tmp_path):
    alpha = start_provider("alpha", ["gpt-4o"], 0.001, 0.002)
    db = tmp_path / "ledger.db"
    proxy = start_proxy("serve", provider_toml("alpha", alpha.url, ["gpt-4o"], 1, 2)
                        + f'[database]\npath = "{db}"\n[routing]\nhealth_interval = 0\n' + TOKENS)
    sent = [
        ({"x-arbstr-app": "notes", "x-title": "ignored"}, "tok-ci-bot-0123456789", "notes"),
        ({"x-title": "My Agent", "http-referer": "https://agent.example/x"}, "tok-ci-bot-0123456789", "My Agent"),
        ({"http-referer": "https://agent.example/page?q=1"}, "tok-research-0123456789", "agent.example"),
        ({"user-agent": "notebook-runner/2.1 (linux)"}, "tok-research-0123456789", "notebook-runner"),
        ({"user-agent": ""}, "tok-research-0123456789", "research"),
        ({"user-agent": ""}, "tok-ci-bot-0123456789", "ci-bot"),
    ]
    with httpx.Client(base_url=proxy.url, timeout=20) as http:
        for headers, token, _ in sent:
            answer = http.post("/v1/chat/completions", json=BODY, headers={**headers, "authorization": f"Bearer {token}"})
            assert answer.status_code == 200, answer.text
        refused = http.post("/v1/chat/completions", json=BODY, headers={"authorization": "Bearer tok-nobody"})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        rows = wait_for_rows(proxy, len(sent))
        assert [r["app"] for r in reversed(rows)] == [app for _, _, app in sent]
        stats = http.get("/v1/stats", params={"group_by": "app"},
                         headers={"authorization": "Bearer tok-research-0123456789"}).json()
    assert {g["app"]: g["requests"] for g in stats["groups"]} == {
        "notes": 1, "My Agent": 1, "agent.example": 1, "notebook-runner": 1, "research": 1, "ci-bot": 1}
    # what names the app stays with arbstr; the client's tokens never reach the provider
    for request in chat_requests(alpha):
        assert not {name for name, _ in request.headers} & {"x-arbstr-app", "x-title", "http-referer"}
        assert "tok-" not in json.dumps(request.headers)
    proxy.stop()
    table = subprocess.run([str(BIN / "arbstr"), "stats", "--db", str(db), "--group-by", "app"],
                           capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    labels = [line.split("  ")[0] for line in table.stdout.splitlines()[1:]]
    assert labels == ["total", "My Agent", "agent.example", "ci-bot", "notebook-runner", "notes", "research"]
    only = json.loads(subprocess.run([str(BIN / "arbstr"), "stats", "--db", str(db), "--app", "notes", "--json"],
                                     capture_output=True, text=True).stdout)
    assert only["totals"]["requests"] == 1

