"""`arbstr serve` with a [wallet]: it reconciles what a crash left in flight before anything else,
and GET /v1/wallet shows amounts, never a token."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import httpx

from arbstr.store import Ledger
from arbstr.wallet import Wallet

from conftest import provider_toml


def test_serve_reconciles_at_start_and_shows_amounts_only(start_proxy, cashu_mint, tmp_path):
    db = tmp_path / "ledger.db"

    async def leave_a_token_in_flight() -> str:
        ledger = Ledger(str(db), 0)
        try:
            wallet = Wallet(ledger, [cashu_mint.url])
            op, _ = await wallet.request_topup(400)
            await wallet.finish_topup(op)
            out = await wallet.send(150, provider="alpha", request_id="r-crashed")  # sent, then "killed"
            return out.token
        finally:
            ledger.close()
    token = asyncio.run(leave_a_token_in_flight())
    proxy = start_proxy("serve", provider_toml("alpha", "http://127.0.0.1:9/v1", ["gpt-4o"], 1, 1)
                        + f'[routing]\nhealth_interval = 0\n[database]\npath = "{db}"\n'
                        + f'[wallet]\nmints = ["{cashu_mint.url}"]\n')
    with proxy.http() as http:
        for _ in range(200):
            answer = http.get("/v1/wallet")
            if answer.json()["spendable_sats"] == 400:
                break
            time.sleep(0.05)
    body = answer.json()
    assert answer.status_code == 200 and body["spendable_sats"] == 400
    assert body["mints"] == [{"url": cashu_mint.url, "spendable_sats": 400, "in_tokens_out_sats": 0,
                              "incoming_sats": 0}]
    assert token not in answer.text and token not in proxy.log()


def test_without_a_wallet_the_endpoint_says_so(start_proxy):
    proxy = start_proxy("serve", provider_toml("alpha", "http://127.0.0.1:9/v1", ["gpt-4o"], 1, 1)
                        + '[routing]\nhealth_interval = 0\n[database]\npath = ":memory:"\n')
    with proxy.http() as http:
        answer = http.get("/v1/wallet")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "no_wallet"


def test_the_owner_sees_the_money_on_health_and_metrics(start_proxy, cashu_mint, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from arbstr.mock import MockModel
    from arbstr.testing.cashunode import CashuNode
    from e2e.conftest import CLIENT_KEY
    from e2e.test_wallet_payments import MODEL, REPLY, START, fund

    node = CashuNode("node", [MockModel(MODEL, 0.05, 0.05, max_completion_tokens=40)], mint_url=cashu_mint.url,
                     reply=REPLY).start()
    try:
        db = str(tmp_path / "arbstr.db")
        fund(db, cashu_mint.url)
        proxy = start_proxy("serve", f'[[providers]]\nname = "node"\nurl = "{node.url}"\nmodels = ["{MODEL}"]\n'
                            f'input_rate = 50\noutput_rate = 50\n'
            + f'[server]\nauth_token = "{CLIENT_KEY}"\n[routing]\nhealth_interval = 0\n[database]\npath = "{db}"\n'
            + f'[wallet]\nmints = ["{cashu_mint.url}"]\nkey_funding_sats = 40\n')
        assert proxy.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]).choices[0].message.content
        asked = lambda: sum(1 for r in node.requests if r.path.endswith("/balance/info"))  # noqa: E731
        with proxy.http() as http:
            assert http.get("/v1/balances").status_code == 200  # asks the node about the new key
            before = asked()
            scraped = http.get("/metrics")
            owner = http.get("/health").json()
            assert asked() == before  # /metrics and /health show what the node last said, never ask it
        with httpx.Client(base_url=proxy.url, timeout=20) as stranger:
            public = stranger.get("/health")
        at_node = Decimal(node.balances_msats()) / 1000
        proxy.stop()
    finally:
        node.stop()
    found = {(s.name, frozenset(s.labels.items())): s.value
             for family in text_string_to_metric_families(scraped.text) for s in family.samples}
    assert found[("arbstr_wallet_sats", frozenset({("mint", cashu_mint.url), ("state", "spendable")}))] == START - 40
    assert found[("arbstr_wallet_sats", frozenset({("mint", cashu_mint.url), ("state", "in_tokens_out")}))] == 0
    assert 0 < at_node < 40
    assert found[("arbstr_key_balance_sats", frozenset({("provider", "node")}))] == float(at_node)
    assert found[("arbstr_key_reserved_sats", frozenset({("provider", "node")}))] == 0
    # The owner's /health: the wallet per mint, and the key as its node last said.
    balances = owner["balances"]
    assert balances["wallet"]["spendable_sats"] == START - 40
    assert balances["wallet"]["mints"][0]["url"] == cashu_mint.url
    assert [(p["name"], Decimal(p["balance_sats"])) for p in balances["providers"]] == [("node", at_node)]
    # A stranger's /health has no money in it, and no key or token is ever shown.
    assert public.status_code == 200 and "balances" not in public.json()
    for text in (scraped.text, str(owner)):
        assert "sk-" not in text and "cashuA" not in text and "cashuB" not in text
