"""`arbstr wallet ...` and `arbstr balances`, run as a person would, against a real mint and a fake
node paid in real ecash."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from arbstr.cli import main
from arbstr.funding import fund_key
from arbstr.mock import MockModel
from arbstr.store import Ledger
from arbstr.testing.cashunode import CashuNode
from arbstr.wallet import Wallet, parse_token

from conftest import provider_toml


@pytest.fixture
def config(tmp_path, cashu_mint):
    def write(name: str = "config", providers: str = "", wallet: bool = True) -> str:
        path = tmp_path / f"{name}.toml"
        text = providers or provider_toml("alpha", "http://127.0.0.1:9/v1", ["gpt-4o"], 1, 1)
        text += f'[database]\npath = "{tmp_path / name}.db"\n'
        if wallet:
            text += f'[wallet]\nmints = ["{cashu_mint.url}"]\n'
        path.write_text(text)
        return str(path)
    return write


def wallet_json(capsys, path: str) -> dict:
    capsys.readouterr()
    assert main(["wallet", "-c", path, "balance", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_topup_send_receive_and_history(config, capsys, monkeypatch, cashu_mint):
    alice, bob = config("alice"), config("bob")
    assert main(["wallet", "-c", alice, "topup", "500"]) == 0
    out = capsys.readouterr().out
    assert "lnbc" in out and "minted 500 sats" in out
    assert main(["wallet", "-c", alice, "send", "120"]) == 0
    token = capsys.readouterr().out.strip()
    assert parse_token(token).amount_sats == 120
    monkeypatch.setattr("sys.stdin", io.StringIO(token + "\n"))
    assert main(["wallet", "-c", bob, "receive", "-"]) == 0
    assert "received 120 sats" in capsys.readouterr().out
    assert wallet_json(capsys, alice)["mints"][cashu_mint.url]["unspent"] == 380
    assert wallet_json(capsys, bob)["mints"][cashu_mint.url]["unspent"] == 120
    assert main(["wallet", "-c", alice, "history", "--json"]) == 0
    history = json.loads(capsys.readouterr().out)
    assert [(e["kind"], e["amount_sats"]) for e in history] == [("send", -120), ("topup", 500)]
    assert token not in json.dumps(history)


def test_errors_are_sentences_not_tracebacks(config, capsys):
    assert main(["wallet", "-c", config("w"), "send", "10"]) == 1
    assert "0 sats" in capsys.readouterr().err
    assert main(["wallet", "-c", config("w"), "receive", "cashuBgarbage"]) == 1
    assert "not a valid Cashu token" in capsys.readouterr().err
    assert main(["wallet", "-c", config("none", wallet=False), "balance"]) == 1
    assert "no [wallet] section" in capsys.readouterr().err


def test_refund_brings_a_wallet_funded_key_back(config, capsys, cashu_mint, tmp_path):
    node = CashuNode("node", [MockModel("gpt-4o", 0.5, 1.5)], mint_url=cashu_mint.url).start()
    try:
        path = config("w", provider_toml("node", node.url, ["gpt-4o"], 1, 1))
        assert main(["wallet", "-c", path, "topup", "300"]) == 0
        ledger = Ledger(str(tmp_path / "w.db"), 0)
        try:
            wallet = Wallet(ledger, [cashu_mint.url])
            key = asyncio.run(fund_key(wallet, "node", node.url, 200))
        finally:
            ledger.close()
        assert node.balance_of(key) == 200_000
        capsys.readouterr()
        assert main(["balances", "-c", path, "--json"]) == 0
        rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows["wallet"]["balance_msats"] == 200_000 and key not in json.dumps(rows)
        assert main(["wallet", "-c", path, "balance", "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["keys"] == [{"provider": "node", "balance_msats": 200_000, "reserved_msats": 0}]
        assert main(["wallet", "-c", path, "refund", "node"]) == 0
        assert "node: 200 sats back" in capsys.readouterr().out
        assert node.balance_of(key) == 0
        assert wallet_json(capsys, path) == {"mints": {cashu_mint.url: {"unspent": 300, "reserved": 0, "incoming": 0}},
                                             "keys": []}
    finally:
        node.stop()
