"""kill -9, ten times over in each paying mode, while the wallet's money is on its way: the nodes kill
the proxy at the exact moments an answer carrying money would be lost (a key made from a token, a
top-up, a refund paid out, an X-Cashu token taken, its change made), and at random moments between.
Each restart reconciles; an orderly exit at the end refunds. Not a sat may be missing: wallet +
balances left at the nodes + what the nodes charged = what the wallet started with.

ARBSTR_CRASH_SEED picks other random moments (the seed is in every failure message)."""

from __future__ import annotations

import os
import random
import threading
import time
from decimal import Decimal

import httpx
import pytest

from arbstr.mock import MockModel
from arbstr.testing.cashunode import CashuNode

from e2e.test_wallet_payments import MODEL, REPLY, START, fund, held

SEED = int(os.environ.get("ARBSTR_CRASH_SEED", "2026"))
KILLS = {
    # Where each run is killed: a node's answer lost on its way (named), or a random moment (None).
    "wallet": ["create", "topup", "refund", None, "create", "topup", None, "refund", None, None],
    "xcashu": ["xcashu_taken", "xcashu_change", None, "xcashu_change", "xcashu_taken", None, "xcashu_change",
               None, "xcashu_taken", None],
}
NODE_AT_WORK = 4.0
"""Seconds a node takes over an X-Cashu answer after taking its token, in the runs killed right then."""
POINT_WAIT = 30.0
"""Seconds a run may take to reach its named kill point (a refund needs a key idle for a second)."""


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


class Killer:
    """Given to the nodes as `before_answer`: SIGKILLs the proxy when its node reaches `where`."""

    def __init__(self) -> None:
        self.where: str | None = None
        self.process = None
        self.fired = threading.Event()

    def arm(self, where: str | None, process) -> None:
        self.fired.clear()
        self.where, self.process = where, process

    def __call__(self, where: str) -> None:
        if where == self.where and not self.fired.is_set():
            self.process.kill()  # SIGKILL: no exit handler, no refund, no flush; the answer is never read
            self.fired.set()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("mode", ["wallet", "xcashu"])
def test_kill_9_at_money_points_loses_no_sat(mode, start_proxy, cashu_mint, tmp_path):
    nodes = [CashuNode(name, [MockModel(MODEL, rate, rate, max_completion_tokens=40)], mint_url=cashu_mint.url,
                       reply=REPLY).start() for name, rate in (("cheap", 0.05), ("dear", 0.2))]
    killer = Killer()
    for node in nodes:
        node.before_answer = killer
    seen: list[str] = []
    try:
        db = str(tmp_path / "arbstr.db")
        fund(db, cashu_mint.url)
        # Tiny fundings and a one-second idle refund: keys are made, topped up and refunded all the time.
        text = (f'[database]\npath = "{db}"\n[routing]\nhealth_interval = 0\nfunds_cooldown = 1\n'
                f'[wallet]\nmints = ["{cashu_mint.url}"]\nkey_funding_sats = 3\ntopup_headroom = 1\n'
                f'refund_after = 1\nxcashu_sats = 2\n')
        for node, rate in zip(nodes, (50, 200)):
            text += (f'[[providers]]\nname = "{node.name}"\nurl = "{node.url}"\nmodels = ["{MODEL}"]\n'
                     f'payment = "{mode}"\ninput_rate = {rate}\noutput_rate = {rate}\n')
        rng = random.Random(f"{SEED}-{mode}")
        for where in KILLS[mode]:
            for node in nodes:
                # Killed once the node took a token, the node is still at work on the answer when the
                # proxy starts again and asks for the change (routstr-core answers 425 meanwhile).
                node.latency = NODE_AT_WORK if where == "xcashu_taken" else 0.0
            proxy = start_proxy("serve", text)
            killer.arm(where, proxy.process)
            stop = threading.Event()
            asking = threading.Thread(target=keep_asking, args=(proxy.url, stop, random.Random(rng.random())))
            asking.start()
            if where is None:
                time.sleep(rng.uniform(0.2, 2.0))
                proxy.process.kill()
            elif not killer.fired.wait(POINT_WAIT):
                proxy.process.kill()
            proxy.process.wait()
            stop.set()
            asking.join()
            seen.append(where if where is None or killer.fired.is_set() else f"not {where}")
            (tmp_path / f"run{len(seen)}.log").write_text(proxy.log())
        killer.arm(None, None)
        for node in nodes:
            node.latency = 0.0
        final = start_proxy("serve", text)
        with final.http() as http:
            for _ in range(400):  # reconcile runs at start
                if http.get("/v1/wallet").json()["mints"][0]["in_tokens_out_sats"] == 0:
                    break
                time.sleep(0.05)
            for _ in range(5):  # 402s until emptied keys are topped up (X-Cashu: until reservations are learned)
                after = http.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": "after"}]})
                if after.status_code == 200:
                    break
                time.sleep(1.2)
        final.stop(grace=90)  # an orderly exit refunds every wallet-funded key (slow on a busy machine)
        log = final.log()
    finally:
        for node in nodes:
            node.stop()
    context = f"seed {SEED}, kills {seen}\n{log[-3000:]}"
    assert seen == KILLS[mode], context  # every named point was reached
    assert after.status_code == 200, (after.text, context)
    wallet = held(db, cashu_mint.url)
    assert wallet["reserved"] == 0 and wallet["incoming"] == 0, (wallet, context)
    at_nodes = sum(n.balances_msats() for n in nodes)
    charged = sum(n.charged_msats() for n in nodes)
    left_below_a_sat = sum(n.refund_remainder_msats for n in nodes)
    assert charged > 0, context
    assert at_nodes == 0, ([(n.name, n.balances_msats()) for n in nodes], context)
    assert wallet["unspent"] + Decimal(at_nodes + charged + left_below_a_sat) / 1000 == START, (wallet, context)
    assert "cashuA" not in log and "cashuB" not in log
