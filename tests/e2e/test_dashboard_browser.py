"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright (which never
downloads a browser of its own here), against `arbstr serve` with a seeded ledger and live traffic.

Set ARBSTR_DASHBOARD_SCREENSHOT=path to keep the screenshot this test takes (README's picture).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from arbstr.store import Ledger
from conftest import provider_toml
from e2e.test_wallet_payments import fund
from test_store import ROW

TOKEN = "browser-token-0123456789"
MINUTE, HOUR, DAY = 60, 3600, 86400
PROVIDERS = {"cheap": (1, 2), "mid": (2, 4), "pricey": (5, 10)}
MODELS = ("gpt-4o", "llama3:8b")
POLICIES = ("default", "code", "default", "cheap-chat")


def seeded_rows(now: float) -> list:
    """A day and a week of traffic: three providers, two models, three policies, some failures."""
    rows = []
    for i in range(72):
        age = (i * 19 + 7) * MINUTE if i < 64 else (2 + (i - 64) * 0.6) * DAY
        provider = ("cheap", "cheap", "mid", "cheap", "pricey")[i % 5]
        failed = i % 13 == 5
        cost = Decimal(PROVIDERS[provider][1]) * Decimal(40 + (i * 37) % 90) / 1000
        rows.append(replace(
            ROW, request_id=f"seed{i:03d}", timestamp=now - age, provider=None if failed else provider,
            model=MODELS[i % 7 == 3], policy=POLICIES[i % 4], input_tokens=200 + i * 3, output_tokens=None if failed else 40 + i,
            cost_sats=None if failed else cost, estimated_cost_sats=None if failed else cost * Decimal("1.12"),
            next_best_cost_sats=None if failed else cost * Decimal("1.6"),
            max_cost_sats=None if failed else cost * Decimal("3.5"), latency_ms=180.0 + (i * 53) % 400,
            ttft_ms=60.0 + i % 40 if i % 3 == 0 else None, streaming=i % 3 == 0, success=not failed,
            status_code=502 if failed else 200, error="upstream_error" if failed else None,
            attempts="pricey=status 503" if i % 9 == 2 else "none"))
    return rows


def spent(rows: list, since: float) -> dict[str, float]:
    totals: dict[str, float] = {}
    for r in rows:
        if r.timestamp >= since and r.success:
            totals[r.provider] = totals.get(r.provider, 0.0) + float(r.cost_sats)
    return totals


WALLET_SATS = 1234


@pytest.fixture
def seeded_proxy(tmp_path, start_provider, start_proxy, cashu_mint):
    now = time.time()
    rows = seeded_rows(now)
    ledger = Ledger(str(tmp_path / "ledger.db"))
    for row in rows:
        ledger.record(row)
    ledger.close()
    fund(str(tmp_path / "ledger.db"), cashu_mint.url, WALLET_SATS)  # the providers are paid by key all the same
    config = "".join(provider_toml(name, start_provider(name, list(MODELS), i / 1000, o / 1000).url, list(MODELS), i, o)
                     for name, (i, o) in PROVIDERS.items())
    proxy = start_proxy("serve", config + f'[server]\nauth_token = "{TOKEN}"\n'
                        f'[database]\npath = "{tmp_path / "ledger.db"}"\n[wallet]\nmints = ["{cashu_mint.url}"]\n')
    return proxy, rows, now


def shown_number(page, selector: str) -> float:
    return float(page.inner_text(selector).split(" ")[0].replace(",", ""))


def chart_totals(page) -> dict[str, float]:
    """What the spend chart was given, per provider (the page keeps it beside the chart)."""
    return page.evaluate("() => Object.fromEntries(Object.entries(window.arbstr.data.spend)"
                         ".map(([name, values]) => [name, values.reduce((a, b) => a + b, 0)]))")


def painted_pixels(page, selector: str) -> int:
    return page.evaluate("""(selector) => {
        const canvas = document.querySelector(selector + ' canvas');
        const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let painted = 0;
        for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) painted++;
        return painted;
    }""", selector)


def choose_range(page, name: str) -> None:
    page.click(f"#ranges button[data-range='{name}']")
    page.wait_for_selector(f"body[data-ready='{name}']", timeout=15000)


def test_the_dashboard_shows_the_seeded_ledger_and_live_requests(seeded_proxy, browser):
    proxy, rows, now = seeded_proxy
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))

    page.goto(f"{proxy.url}/dashboard")
    page.fill("input[name=token]", TOKEN)  # the sign-in form, once
    page.click("button[type=submit]")
    page.wait_for_selector("body[data-ready='24h']", timeout=15000)

    day = spent(rows, now - DAY)
    assert chart_totals(page) == pytest.approx(day, rel=1e-9)
    assert shown_number(page, "#spent") == pytest.approx(sum(day.values()), abs=0.01)
    saved_next = sum(float(r.next_best_cost_sats - r.cost_sats) for r in rows if r.success and r.timestamp >= now - DAY)
    assert shown_number(page, "#saved-next") == pytest.approx(saved_next, abs=0.01)
    saved_max = sum(float(r.max_cost_sats - r.cost_sats) for r in rows if r.success and r.timestamp >= now - DAY)
    # the savings chart's running totals end at the same figures
    most, following = page.evaluate("() => window.arbstr.charts.saved.data.slice(1).map((s) => s[s.length - 1])")
    assert (most, following) == pytest.approx((saved_max, saved_next), rel=1e-9)
    for name, total in day.items():
        legend = page.inner_text(f"#spend-legend li[data-provider='{name}']")
        assert legend.startswith(f"{name}: ") and float(legend.split(": ")[1].split(" ")[0]) == pytest.approx(total, abs=0.01)
    assert painted_pixels(page, "#chart-spend") > 500 and painted_pixels(page, "#chart-saved") > 500
    failed = sum(1 for r in rows if not r.success and r.timestamp >= now - DAY)
    assert page.inner_text("#errors").startswith(f"{failed} (")
    assert page.inner_text("#share-provider").count("of requests") == 4  # three providers and the failures
    # each node's word on its key's balance: the mock nodes start every key at 100,000 sats
    assert [c.inner_text() for c in page.query_selector_all("#health td.balance")] == ["100,000 sats"] * 3
    assert page.inner_text("#wallet") == f"wallet: {WALLET_SATS:,} sats spendable"

    choose_range(page, "7d")
    week = spent(rows, now - 7 * DAY)
    assert sum(week.values()) > sum(day.values())
    assert chart_totals(page) == pytest.approx(week, rel=1e-9)
    assert shown_number(page, "#spent") == pytest.approx(sum(week.values()), abs=0.01)

    choose_range(page, "1h")
    hour = spent(rows, now - HOUR)
    assert chart_totals(page) == pytest.approx(hour, rel=1e-9)

    page.select_option("#f-provider", "pricey")
    page.wait_for_selector("body[data-ready='1h']", timeout=15000)
    choose_range(page, "24h")
    assert list(chart_totals(page)) == ["pricey"]
    assert chart_totals(page)["pricey"] == pytest.approx(day["pricey"], rel=1e-9)
    page.select_option("#f-provider", "")
    page.wait_for_selector("body[data-ready='24h']", timeout=15000)

    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=TOKEN, max_retries=0, timeout=20)
    answer = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "live row please"}])
    request_id = answer.headers["x-arbstr-request-id"]
    row = page.wait_for_selector(f"#latest tr[data-request-id='{request_id}']", timeout=10000)
    assert "cheap" in row.inner_text() and "ok" in row.inner_text()
    # its charge was checked against the advertised prices: shown beside the provider's state
    choose_range(page, "1h")
    charges = {c.evaluate("td => td.parentElement.dataset.provider"): c.inner_text()
               for c in page.query_selector_all("#health td.charges")}
    assert charges == {"cheap": "0 of 1", "mid": "–", "pricey": "–"}

    shot = Path(proxy.log_path.parent / "dashboard.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    if keep := os.environ.get("ARBSTR_DASHBOARD_SCREENSHOT"):
        shutil.copy(shot, keep)
    assert problems == []


def test_a_phone_sees_the_savings_first_and_no_sideways_page(seeded_proxy, browser):
    proxy, rows, now = seeded_proxy
    page = browser.new_page()
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{proxy.url}/dashboard?token={TOKEN}")  # a link signs in too
    page.wait_for_selector("body[data-ready='24h']", timeout=15000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    first_card = page.evaluate("document.querySelector('main > section.card:not([hidden])').id")
    assert first_card == "savings"
    assert page.url.endswith("/dashboard")  # the token left the address bar


def test_an_empty_ledger_explains_itself(tmp_path, start_provider, start_proxy, browser):
    provider = start_provider("only", ["gpt-4o"], 0.001, 0.001)
    proxy = start_proxy("serve", provider_toml("only", provider.url, ["gpt-4o"], 1, 1)
                        + '[database]\npath = ":memory:"\n')
    page = browser.new_page()
    page.goto(f"{proxy.url}/dashboard")
    page.wait_for_selector("body[data-ready='24h']", timeout=15000)
    assert page.is_visible("#empty") and "No requests in this range yet" in page.inner_text("#empty")
    assert f"{proxy.url}/v1" in page.inner_text("#empty")
    assert not page.is_visible("#savings") and page.is_visible("#health")
