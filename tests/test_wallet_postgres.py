"""The wallet on PostgreSQL: the same money path and crash recovery, on a real server."""

from __future__ import annotations

import asyncio

from arbstr.store import Ledger
from arbstr.wallet import Wallet

from test_store_postgres import database_url, server  # noqa: F401  (fixtures)


def test_the_wallet_keeps_its_proofs_on_postgresql(database_url, cashu_mint):  # noqa: F811
    async def go():
        ledger = Ledger(database_url, 0)
        try:
            wallet = Wallet(ledger, [cashu_mint.url])
            op, _ = await wallet.request_topup(500)
            await wallet.finish_topup(op)
            paid = await wallet.send(123, provider="node", request_id="r1")
            await wallet.send(45)  # never settled: a crash leaves it pending
            await wallet.settle(paid.operation)
        finally:
            ledger.close()
        ledger = Ledger(database_url, 0)
        try:
            restarted = Wallet(ledger, [cashu_mint.url])
            report = await restarted.reconcile()
            return report, await restarted.balance(), [e["kind"] for e in await restarted.history()]
        finally:
            ledger.close()
    report, balance, kinds = asyncio.run(go())
    assert report.reclaimed_sats == 45
    assert balance[cashu_mint.url] == {"unspent": 377, "reserved": 0, "incoming": 0}
    assert kinds == ["pay", "topup"]
