"""`arbstr serve` with a [wallet]: it reconciles what a crash left in flight before anything else,
and GET /v1/wallet shows amounts, never a token."""

from __future__ import annotations

import asyncio
import time

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
