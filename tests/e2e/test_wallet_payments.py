"""The proof that no sat is lost: `arbstr serve` paying three nodes from one wallet, in `wallet` and in
`xcashu` mode, over 100+ requests (streamed and not) with 402s, a dead provider and cut streams.
Afterwards: wallet + balances left at the nodes + what the nodes charged = what the wallet held."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time
from decimal import Decimal

import openai
import pytest

from arbstr.mock import MockModel
from arbstr.store import Ledger
from arbstr.testing.cashunode import CashuNode
from arbstr.wallet import Wallet

from e2e.conftest import free_port

START = 3000
MODEL = "gpt-4o"
REQUESTS = 104
REPLY = " ".join(f"w{i}" for i in range(12))


def fund(db: str, mint: str, sats: int = START) -> None:
    async def go() -> None:
        ledger = Ledger(db, 0)
        try:
            wallet = Wallet(ledger, [mint])
            op, _ = await wallet.request_topup(sats)
            assert await wallet.finish_topup(op) == sats
        finally:
            ledger.close()
    asyncio.run(go())


def held(db: str, mint: str) -> dict[str, int]:
    async def go() -> dict[str, int]:
        ledger = Ledger(db, 0)
        try:
            return (await Wallet(ledger, [mint]).balance())[mint]
        finally:
            ledger.close()
    return asyncio.run(go())


def config(mode: str, nodes: list[CashuNode], dead_port: int, db: str, mint: str) -> str:
    text = (f'[database]\npath = "{db}"\n[routing]\nhealth_interval = 0\ncooldown = 0.5\nfailure_threshold = 1\n'
            f'[wallet]\nmints = ["{mint}"]\nkey_funding_sats = 20\nxcashu_sats = 2\n')
    # The dead provider is the cheapest: every request tries it first while its breaker lets it.
    text += (f'[[providers]]\nname = "dead"\nurl = "http://127.0.0.1:{dead_port}/v1"\npayment = "{mode}"\n'
             f'models = ["{MODEL}"]\ninput_rate = 0.1\noutput_rate = 0.1\n')
    for node, rate in zip(nodes, (0.05, 0.1, 0.2)):
        text += (f'[[providers]]\nname = "{node.name}"\nurl = "{node.url}"\npayment = "{mode}"\n'
                 f'models = ["{MODEL}"]\ninput_rate = {rate * 1000}\noutput_rate = {rate * 1000}\n')
    return text


@pytest.mark.timeout(400)  # X-Cashu: three mint swaps a request (pay, the node's redeem, the change)
@pytest.mark.parametrize("mode", ["wallet", "xcashu"])
def test_every_sat_is_accounted_for(mode, start_proxy, cashu_mint, tmp_path):
    # Nodes reserve a full answer's cost up front: 40 tokens at most keeps that to a few sats.
    nodes = [CashuNode(name, [MockModel(MODEL, rate, rate, max_completion_tokens=40)], mint_url=cashu_mint.url,
                       reply=REPLY).start() for name, rate in (("cheap", 0.05), ("mid", 0.1), ("dear", 0.2))]
    try:
        db = str(tmp_path / "arbstr.db")
        fund(db, cashu_mint.url)
        # arbstr's debug lines too: a token must not reach the log at any level
        proxy = start_proxy("serve", config(mode, nodes, free_port(), db, cashu_mint.url),
                            env={**os.environ, "ARBSTR_LOG": "debug"})
        client = proxy.client()
        rng = random.Random(13)
        answered = cut = 0
        errors: list[str] = []
        for index in range(REQUESTS):
            stream = index % 2 == 1
            cheap = nodes[0]
            cheap.cut_stream_after = 3 if rng.random() < 0.15 else None
            messages = [{"role": "user", "content": f"request {index} " + "word " * rng.randint(1, 30)}]
            try:
                if stream:
                    text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
                        model=MODEL, messages=messages, stream=True) if chunk.choices)
                else:
                    text = client.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content
                answered += text.strip().startswith("w0")
            except (openai.APIError, openai.APIConnectionError) as exc:
                cut += 1
                errors.append(f"{index} {stream} {type(exc).__name__} {str(exc)[:300]}")
        for node in nodes:
            node.cut_stream_after = None
        proxy.stop()  # SIGTERM: wallet-funded keys are refunded at exit
        log = proxy.log()
    finally:
        for node in nodes:
            node.stop()
    assert answered >= REQUESTS * 0.7 and answered + cut == REQUESTS, "\n".join(errors[:8]) + log[-3000:]
    wallet = held(db, cashu_mint.url)
    assert wallet["reserved"] == 0 and wallet["incoming"] == 0, wallet
    at_nodes = sum(n.balances_msats() for n in nodes)
    charged = sum(n.charged_msats() for n in nodes)
    left_below_a_sat = sum(n.refund_remainder_msats for n in nodes)
    assert charged > 0 and sum(1 for n in nodes if n.charged_msats()) >= 2
    assert wallet["unspent"] + Decimal(at_nodes + charged + left_below_a_sat) / 1000 == START
    if mode == "wallet":
        assert at_nodes == 0  # refunded at exit
    else:
        # Paid per request, the ledger's costs are what left the wallet (each token minus its change),
        # to the sat: answers cut short and attempts failed over included.
        costs = sqlite3.connect(db).execute("SELECT SUM(cost_nsats) FROM requests").fetchone()[0]
        assert Decimal(costs) / 10**9 == START - wallet["unspent"], (costs, wallet)
    assert "cashuA" not in log and "cashuB" not in log
    assert " DEBUG " in log  # the run did log at debug level
    ledger = sqlite3.connect(db)
    for (table,) in ledger.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        rows = repr(ledger.execute(f"SELECT * FROM {table}").fetchall())
        assert "cashuA" not in rows and "cashuB" not in rows, table  # tokens are never stored whole
    # The run met what it was meant to: 402s, the dead provider, streams cut short.
    assert "cause=out_of_funds" in log and "passed over dead" in log and cut > 0


def chat(proxy) -> object:
    return proxy.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}])


def test_a_node_that_does_not_take_the_wallets_mint_is_never_paid(start_proxy, cashu_mint, tmp_path):
    foreign = CashuNode("foreign", [MockModel(MODEL, 0.01, 0.01, max_completion_tokens=40)], mint_url=cashu_mint.url,
                        advertised_mints=["https://another-mint.example"], reply=REPLY).start()
    home = CashuNode("home", [MockModel(MODEL, 0.1, 0.1, max_completion_tokens=40)], mint_url=cashu_mint.url,
                     reply=REPLY).start()
    try:
        db = str(tmp_path / "arbstr.db")
        fund(db, cashu_mint.url)
        text = (f'[database]\npath = "{db}"\n[routing]\nhealth_interval = 0\n'
                f'[wallet]\nmints = ["{cashu_mint.url}"]\nkey_funding_sats = 50\n')
        for node, rate in ((foreign, 10), (home, 100)):  # the foreign node is the cheaper one
            text += (f'[[providers]]\nname = "{node.name}"\nurl = "{node.url}"\nmodels = ["{MODEL}"]\n'
                     f'input_rate = {rate}\noutput_rate = {rate}\n')
        proxy = start_proxy("serve", text)
        for _ in range(100):  # the check of each node's /v1/info runs at start, off the request path
            if any(r.path == "/v1/info" for r in foreign.requests):
                break
            time.sleep(0.05)
        time.sleep(0.2)
        answers = [chat(proxy) for _ in range(3)]
        proxy.stop()
    finally:
        foreign.stop()
        home.stop()
    assert [a.headers["x-arbstr-provider"] for a in answers] == ["home"] * 3
    # reading its mints and its prices carries no payment; nothing else reaches it
    assert not [r for r in foreign.requests if r.path not in ("/v1/info", "/v1/models")]
    assert foreign.balances_msats() == 0 and home.charged_msats() > 0


def test_a_wallet_too_small_moves_on_then_answers_402_with_the_shortfall(start_proxy, cashu_mint, tmp_path):
    # "big" is cheaper per token but reserves a 4,000-token answer; "small" reserves 40 tokens.
    big = CashuNode("big", [MockModel(MODEL, 0.05, 0.05, max_completion_tokens=4000)], mint_url=cashu_mint.url,
                    reply=REPLY).start()
    small = CashuNode("small", [MockModel(MODEL, 0.1, 0.1, max_completion_tokens=40)], mint_url=cashu_mint.url,
                      reply=REPLY).start()
    try:
        db = str(tmp_path / "arbstr.db")
        fund(db, cashu_mint.url, 40)
        text = (f'[database]\npath = "{db}"\n[routing]\nhealth_interval = 0\n'
                f'[wallet]\nmints = ["{cashu_mint.url}"]\nxcashu_sats = 20\n')
        for node, rate in ((big, 50), (small, 100)):
            text += (f'[[providers]]\nname = "{node.name}"\nurl = "{node.url}"\npayment = "xcashu"\n'
                     f'models = ["{MODEL}"]\ninput_rate = {rate}\noutput_rate = {rate}\n')
        proxy = start_proxy("serve", text)
        first = chat(proxy)  # big: 402 (20 sats is below its reservation), small answers
        second = chat(proxy)  # big: the wallet cannot pay its reservation, so small at once
        asked_big = len([r for r in big.requests if r.path.endswith("/chat/completions")])
        proxy.stop()
        only_big = start_proxy("serve", text.split("[[providers]]")[0] + "[[providers]]" + text.split("[[providers]]")[1])
        with pytest.raises(openai.APIStatusError):
            chat(only_big)  # it learns big's reservation from its 402
        with pytest.raises(openai.APIStatusError) as short:
            chat(only_big)  # which the wallet cannot pay, and no other provider serves the model
        only_big.stop()
    finally:
        big.stop()
        small.stop()
    assert first.headers["x-arbstr-provider"] == second.headers["x-arbstr-provider"] == "small"
    assert "out_of_funds" in first.headers["x-arbstr-attempts"]
    # Decided when planning: big was never tried for the second request, not even for a token.
    assert second.headers["x-arbstr-attempts"] == "none" and asked_big == 1
    error = short.value.response.json()["error"]
    assert short.value.status_code == 402 and error["code"] == "insufficient_funds"
    assert error["shortfall_sats"] > 0 and f"{error['shortfall_sats']} sats short" in error["message"]
    assert "attempts" not in error  # known when planning: no attempt was made
    assert big.charged_msats() == 0


def test_an_xcashu_answer_whose_body_is_cut_costs_what_left_the_wallet(start_proxy, cashu_mint, tmp_path):
    """routstr-core v0.4.5 sends an X-Cashu answer's change header, then a body longer than its
    Content-Length says: the client gets an error, the node has charged. The ledger records what the
    change shows was taken, so its costs add up to what left the wallet, to the sat."""
    node = CashuNode("cutter", [MockModel(MODEL, 0.1, 0.1, max_completion_tokens=40)], mint_url=cashu_mint.url,
                     reply=REPLY).start()
    node.xcashu_cut_body = True
    try:
        db = str(tmp_path / "arbstr.db")
        fund(db, cashu_mint.url, 100)
        proxy = start_proxy("serve", f'[database]\npath = "{db}"\n[routing]\nhealth_interval = 0\n'
                                     f'[wallet]\nmints = ["{cashu_mint.url}"]\nxcashu_sats = 20\n'
                                     f'[[providers]]\nname = "cutter"\nurl = "{node.url}"\npayment = "xcashu"\n'
                                     f'models = ["{MODEL}"]\ninput_rate = 100\noutput_rate = 100\n')
        failed = 0
        for _ in range(3):
            try:
                chat(proxy)
            except (openai.APIStatusError, openai.APIConnectionError):
                failed += 1
        proxy.stop()
    finally:
        node.stop()
    wallet = held(db, cashu_mint.url)
    rows = sqlite3.connect(db).execute("SELECT cost_nsats, cost_reported, success FROM requests").fetchall()
    assert failed == 3 and len(rows) == 3 and node.charged_msats() > 0
    assert wallet["reserved"] == 0 and wallet["incoming"] == 0
    assert all(cost and cost > 0 and reported and not success for cost, reported, success in rows), rows
    assert Decimal(sum(cost for cost, _, _ in rows)) / 10**9 == 100 - wallet["unspent"]
