"""The fake Routstr node that takes real ecash: its money endpoints and the X-Cashu quirks measured
on real nodes, checked against a real mint (every token it takes is redeemed there)."""

from __future__ import annotations

import asyncio
import math
import socket

import httpx
import pytest

from arbstr.testing.cashunode import CashuNode
from arbstr.wallet import Wallet, parse_token

from conftest import FUNDED_SATS

MODEL = "gpt-4o"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 20}


def token(wallet: Wallet, sats: int) -> str:
    async def send():
        out = await wallet.send(sats)
        await wallet.settle(out.operation)
        return out.token
    return asyncio.run(send())


def receive(wallet: Wallet, change: str) -> int:
    return asyncio.run(wallet.receive(change, kind="change"))


def cost_sats(node: CashuNode) -> int:
    """What the one completion the node answered cost, rounded up as X-Cashu charges it."""
    return math.ceil(node.charged_msats() / 1000)


class TestKeys:
    def test_a_token_becomes_a_key_holding_its_value_once(self, node, wallet):
        paid = token(wallet, 100)
        first = httpx.get(f"{node._origin}/v1/balance/create", params={"initial_balance_token": paid}).json()
        again = httpx.get(f"{node._origin}/v1/balance/create", params={"initial_balance_token": paid}).json()
        assert first == again == {"api_key": first["api_key"], "balance": 100_000}
        info = httpx.get(f"{node.url}/balance/info", headers={"Authorization": f"Bearer {first['api_key']}"}).json()
        assert info["balance"] == 100_000 and node.balances_msats() == 100_000

    def test_a_spent_token_makes_no_key(self, node, wallet):
        paid = token(wallet, 10)
        receive(wallet, paid)  # spent elsewhere first
        response = httpx.get(f"{node._origin}/v1/balance/create", params={"initial_balance_token": paid})
        assert response.status_code == 400 and response.json()["error"]["code"] == "cashu_token_already_spent"
        assert node.balances_msats() == 0

    def test_topup_spend_and_refund_account_for_every_msat(self, node, wallet):
        key = httpx.get(f"{node._origin}/v1/balance/create",
                        params={"initial_balance_token": token(wallet, 50)}).json()["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        topped = httpx.post(f"{node._origin}/v1/balance/topup", json={"cashu_token": token(wallet, 30)}, headers=auth)
        assert topped.json() == {"msats": 30_000}
        assert httpx.post(f"{node.url}/chat/completions", json=CHAT, headers=auth).status_code == 200
        spent = node.charged_msats()
        refund = httpx.post(f"{node._origin}/v1/balance/refund", headers=auth).json()
        assert int(refund["sats"]) == (80_000 - spent) // 1000
        assert receive(wallet, refund["token"]) == int(refund["sats"])
        assert node.balances_msats() == 0
        assert int(refund["sats"]) * 1000 + node.refund_remainder_msats + spent == 80_000
        assert asyncio.run(wallet.spendable()) == FUNDED_SATS - 80 + int(refund["sats"])
        again = httpx.post(f"{node._origin}/v1/balance/refund", headers=auth)  # as routstr-core: the same token
        assert again.status_code == 200 and again.json() == refund

    def test_an_unknown_key_is_refused(self, node):
        response = httpx.post(f"{node.url}/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-nope"})
        assert response.status_code == 401


class TestPayPerRequest:
    def test_change_comes_back_in_the_header(self, node, wallet):
        response = httpx.post(f"{node.url}/chat/completions", json=CHAT, headers={"X-Cashu": token(wallet, 40)})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 8
        change = response.headers["x-cashu"]
        assert parse_token(change).amount_sats == 40 - cost_sats(node)
        assert receive(wallet, change) == 40 - cost_sats(node)
        assert asyncio.run(wallet.spendable()) == FUNDED_SATS - cost_sats(node)

    def test_a_token_too_small_is_refused_and_not_taken(self, node, wallet):
        small = token(wallet, 2)
        response = httpx.post(f"{node.url}/chat/completions", json=CHAT, headers={"X-Cashu": small})
        assert response.status_code == 402
        detail = response.json()["detail"]
        assert detail["reason"] == "Insufficient balance" and detail["amount_required_msat"] > 2000
        assert "x-cashu" not in response.headers
        assert receive(wallet, small) == 2  # still spendable

    def test_a_spent_token_is_refused(self, node, wallet):
        paid = token(wallet, 40)
        httpx.post(f"{node.url}/chat/completions", json=CHAT, headers={"X-Cashu": paid})
        again = httpx.post(f"{node.url}/chat/completions", json=CHAT, headers={"X-Cashu": paid})
        assert again.status_code == 400 and again.json()["error"]["code"] == "cashu_token_already_spent"

    def test_a_failed_upstream_gives_everything_back(self, node, wallet):
        node.fail_status = 502
        response = httpx.post(f"{node.url}/chat/completions", json=CHAT, headers={"X-Cashu": token(wallet, 40)})
        assert response.status_code == 502 and parse_token(response.headers["x-cashu"]).amount_sats == 40

    def test_a_stream_arrives_whole_with_its_change_in_the_headers(self, node, wallet):
        with httpx.stream("POST", f"{node.url}/chat/completions", json={**CHAT, "stream": True},
                          headers={"X-Cashu": token(wallet, 40)}) as response:
            change = response.headers["x-cashu"]  # only known once the answer was complete
            body = response.read()
        assert body.rstrip().endswith(b"data: [DONE]") and b'"usage"' in body
        assert receive(wallet, change) == 40 - cost_sats(node)

    def test_the_change_of_a_client_that_left_waits_at_the_refund_endpoint(self, node, wallet):
        node.latency = 0.3
        paid = token(wallet, 40)
        with socket.create_connection(("127.0.0.1", node.port)) as raw:
            body = httpx.Request("POST", f"{node.url}/chat/completions", json={**CHAT, "stream": True},
                                 headers={"X-Cashu": paid})
            head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Cashu: {paid}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body.read())}\r\n\r\n")
            raw.sendall(head.encode() + body.read())
        for _ in range(100):  # the node finishes the answer after the client left
            refund = httpx.post(f"{node._origin}/v1/balance/refund", headers={"X-Cashu": paid})
            if refund.status_code == 200:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert refund.status_code == 200 and refund.headers["x-cashu"] == refund.json()["token"]
        assert receive(wallet, refund.json()["token"]) == 40 - cost_sats(node)

    def test_a_cut_body_still_carries_the_change_header(self, node, wallet):
        node.xcashu_cut_body = True
        with httpx.stream("POST", f"{node.url}/chat/completions", json=CHAT,
                          headers={"X-Cashu": token(wallet, 40)}) as response:
            change = response.headers["x-cashu"]
            with pytest.raises(httpx.RemoteProtocolError):
                response.read()
        assert receive(wallet, change) == 40 - cost_sats(node)

    def test_info_names_the_mint(self, node, cashu_mint):
        assert httpx.get(f"{node.url}/info").json()["mints"] == [cashu_mint.url]
