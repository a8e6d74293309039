"""GET /metrics from the real proxy after real traffic: parsed with prometheus-client's own parser,
agreeing with the ledger's /v1/stats, accepted by promtool, and behind the auth token."""

from __future__ import annotations

import subprocess
from decimal import Decimal

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import provider_toml
from e2e.conftest import KINDS, free_port

pytestmark = pytest.mark.parametrize("kind", KINDS)
TOKEN = "metrics-token-0123"
HI = [{"role": "user", "content": "hello there"}]


def scrape(http: httpx.Client) -> dict[tuple[str, frozenset], float]:
    answer = http.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(answer.text) for s in family.samples}


def total(found: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in found.items() if n == name and set(labels.items()) <= ls)


def test_metrics_agree_with_the_ledger_after_real_traffic(kind, start_provider, start_proxy):
    cheap = start_provider("cheap", ["gpt-4o"], 0.0025, 0.01, 0.001)
    pricey = start_provider("pricey", ["gpt-4o"], 0.005, 0.02, 0.001)
    dead_url = f"http://127.0.0.1:{free_port()}"
    config = (provider_toml("dead", dead_url, ["gpt-4o"], 1, 1)  # cheapest, and refuses every connection
              + provider_toml("cheap", cheap.url, ["gpt-4o"], 2.5, 10, 0.001)
              + provider_toml("pricey", pricey.url, ["gpt-4o"], 5, 20, 0.001)
              + f'[routing]\nhealth_interval = 0\n[server]\nauth_token = "{TOKEN}"\n'
              + '[database]\npath = "ledger.db"\n')
    proxy = start_proxy(kind, config)
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=TOKEN, max_retries=0, timeout=20)
    client.chat.completions.create(model="gpt-4o", messages=HI)
    for _ in client.chat.completions.create(model="gpt-4o", messages=HI, stream=True):
        pass
    client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=5)
    with httpx.Client(base_url=proxy.url, timeout=10) as anonymous:
        assert anonymous.get("/metrics").status_code == 401
    with httpx.Client(base_url=proxy.url, timeout=10, headers={"authorization": f"Bearer {TOKEN}"}) as http:
        found = scrape(http)
        stats = http.get("/v1/stats").json()["totals"]
        exposition = http.get("/metrics").content
    assert TOKEN not in exposition.decode()
    assert total(found, "arbstr_requests_total", provider="cheap", model="gpt-4o", policy="default",
                 status="200") == 3 == stats["requests"]
    assert total(found, "arbstr_spent_sats_total") == pytest.approx(float(Decimal(stats["cost_sats"])))
    assert total(found, "arbstr_saved_sats_total", versus="most_expensive") == pytest.approx(
        float(Decimal(stats["saved_vs_most_expensive_sats"])))
    assert total(found, "arbstr_tokens_total", direction="input") == stats["input_tokens"]
    assert total(found, "arbstr_tokens_total", direction="output") == stats["output_tokens"]
    # dead refused once and its breaker opened: later plans put it last, after cheap answered
    assert total(found, "arbstr_failovers_total", provider="dead", cause="refused") == 1
    assert total(found, "arbstr_request_duration_seconds_count", provider="cheap") == 3
    assert total(found, "arbstr_time_to_first_token_seconds_count", provider="cheap") == 1
    assert total(found, "arbstr_provider_state", provider="dead", state="open") == 1
    assert total(found, "arbstr_provider_state", provider="cheap", state="up") == 1
    assert total(found, "arbstr_ledger_rows_lost_total") == 0
    check = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
