"""kill -9 at random points, ten times over, while wallet-funded keys are made, topped up and
refunded; then a restart reconciles and an orderly exit refunds. Not a sat may be missing:
wallet + balances left at the nodes + what the nodes charged = what the wallet started with."""

from __future__ import annotations

import random
import threading
import time
from decimal import Decimal

import httpx
import pytest

from arbstr.mock import MockModel
from arbstr.testing.cashunode import CashuNode

from e2e.test_wallet_payments import MODEL, REPLY, START, fund, held

KILLS = 10


def keep_asking(url: str, stop: threading.Event, rng: random.Random) -> None:
    """Requests until told to stop, with pauses long enough for keys to go idle and be refunded."""
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            try:
                client.post(f"{url}/v1/chat/completions", json={
                    "model": MODEL, "stream": rng.random() < 0.5,
                    "messages": [{"role": "user", "content": "x " * rng.randint(1, 40)}]})
            except httpx.HTTPError:
                pass
            stop.wait(rng.choice((0.0, 0.0, 0.3, 1.2)))


@pytest.mark.timeout(400)
@pytest.mark.xfail(strict=False, reason=(
    "known money bug, issue 13 stays open: some kill -9 points lose sats (17 of 3,000 in one run, all "
    "keys at zero afterwards), most likely a key refund the node paid out just before the kill; the "
    "test stays here, run every time, to show it"))
def test_kill_9_at_random_points_loses_no_sat(start_proxy, cashu_mint, tmp_path):
    nodes = [CashuNode(name, [MockModel(MODEL, rate, rate, max_completion_tokens=40)], mint_url=cashu_mint.url,
                       reply=REPLY).start() for name, rate in (("cheap", 0.05), ("dear", 0.2))]
    try:
        db = str(tmp_path / "arbstr.db")
        fund(db, cashu_mint.url)
        # Tiny fundings and a one-second idle refund: keys are made, topped up and refunded all the time.
        text = (f'[database]\npath = "{db}"\n[routing]\nhealth_interval = 0\nfunds_cooldown = 1\n'
                f'[wallet]\nmints = ["{cashu_mint.url}"]\nkey_funding_sats = 3\ntopup_headroom = 1\n'
                f'refund_after = 1\n')
        for node, rate in zip(nodes, (50, 200)):
            text += (f'[[providers]]\nname = "{node.name}"\nurl = "{node.url}"\nmodels = ["{MODEL}"]\n'
                     f'input_rate = {rate}\noutput_rate = {rate}\n')
        rng = random.Random(2026)
        for _ in range(KILLS):
            proxy = start_proxy("serve", text)
            stop = threading.Event()
            asking = threading.Thread(target=keep_asking, args=(proxy.url, stop, random.Random(rng.random())))
            asking.start()
            time.sleep(rng.uniform(0.2, 2.0))
            proxy.process.kill()  # SIGKILL: no exit handler, no refund, no flush
            proxy.process.wait()
            stop.set()
            asking.join()
        final = start_proxy("serve", text)
        with final.http() as http:
            for _ in range(400):  # reconcile runs at start
                if http.get("/v1/wallet").json()["mints"][0]["in_tokens_out_sats"] == 0:
                    break
                time.sleep(0.05)
            assert http.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "after"}]}).status_code == 200
        final.stop(grace=90)  # an orderly exit refunds every wallet-funded key (slow on a busy machine)
    finally:
        for node in nodes:
            node.stop()
    wallet = held(db, cashu_mint.url)
    assert wallet["reserved"] == 0 and wallet["incoming"] == 0, wallet
    at_nodes = sum(n.balances_msats() for n in nodes)
    charged = sum(n.charged_msats() for n in nodes)
    left_below_a_sat = sum(n.refund_remainder_msats for n in nodes)
    assert charged > 0
    assert at_nodes == 0, [(n.name, n.balances_msats()) for n in nodes]
    assert wallet["unspent"] + Decimal(at_nodes + charged + left_below_a_sat) / 1000 == START
