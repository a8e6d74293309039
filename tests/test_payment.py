"""Wallet-paid providers, driven the way an exchange drives a payment (credentials, response head,
end state) against a fake node paid in real ecash and a real mint: every sat accounted for."""

from __future__ import annotations

import asyncio
import math
import socket
from decimal import Decimal
from types import SimpleNamespace

import httpx
import pytest

from arbstr.errors import WalletError
from arbstr.payment import WalletPayments
from arbstr.store import Ledger
from arbstr.testing.cashunode import CashuNode
from arbstr.wallet import Wallet, key_for_token

from conftest import FUNDED_SATS as START

MODEL = "gpt-4o"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 20}


class Attempt:
    """What a payment reads of an exchange: the request, and how the attempt ended."""

    def __init__(self, stream: bool = False) -> None:
        self.request = SimpleNamespace(model=MODEL, stream=stream, request_id="req-1")
        self.attempt = SimpleNamespace(detail="")
        self.paid_msats = None


def payments(wallet: Wallet, node: CashuNode, mode: str, **overrides) -> WalletPayments:
    settings = {"refund_after": 600.0, "key_funding_sats": 300, "topup_headroom": Decimal(2), "xcashu_sats": 50}
    return WalletPayments(wallet, [("node", node.url, mode)], **{**settings, **overrides})


async def attempt(book: WalletPayments, node: CashuNode, body: dict = CHAT,
                  exchange: Attempt | None = None) -> tuple[int, str]:
    """One request as an exchange makes it: credentials, send, head to the payment, body, end."""
    payment = book.payments["node"]
    exchange = exchange or Attempt(stream=body.get("stream", False))
    headers = await payment.headers(exchange)
    async with httpx.AsyncClient() as client:
        try:
            async with client.stream("POST", f"{node.url}/chat/completions", json=body,
                                     headers={k.decode(): v.decode() for k, v in headers}) as response:
                await payment.received(exchange, response.status_code,
                                       [(k.encode(), v.encode()) for k, v in response.headers.items()])
                try:
                    raw = await response.aread()
                    state = "ok" if response.status_code == 200 else {402: "out_of_funds"}.get(
                        response.status_code, "status")
                except httpx.RemoteProtocolError:
                    raw, state = b"", "body_cut"
        except httpx.ConnectError:
            payment.finished(exchange, "refused")
            return 0, "refused"
    exchange.attempt.detail = raw.decode(errors="replace")
    payment.finished(exchange, state)
    return response.status_code, state


def total_sats(wallet: Wallet, node: CashuNode) -> Decimal:
    """Wallet + what the node holds for us + what it charged + sub-sat refund remainders, in sats."""
    held = asyncio.run(wallet.balance())
    assert all(b["reserved"] == 0 and b["incoming"] == 0 for b in held.values()), held  # nothing left in flight
    in_wallet = sum(b["unspent"] for b in held.values())
    return in_wallet + Decimal(node.balances_msats() + node.charged_msats() + node.refund_remainder_msats) / 1000


class TestXCashu:
    def test_change_comes_back_and_every_sat_is_accounted(self, wallet, node):
        book = payments(wallet, node, "xcashu")

        async def go():
            results = [await attempt(book, node), await attempt(book, node, {**CHAT, "stream": True})]
            await book.close()
            return results
        assert run(go()) == [(200, "ok"), (200, "ok")]
        spent = asyncio.run(wallet.spendable())
        assert START - spent == node.charged_msats() // 1000 == 2 * math.ceil(node.charged_msats() / 2000)
        assert total_sats(wallet, node) == START

    def test_a_402_is_not_taken_and_teaches_the_reservation(self, wallet, node):
        book = payments(wallet, node, "xcashu", xcashu_sats=1)

        async def go():
            first = await attempt(book, node)
            second = await attempt(book, node)
            await book.close()
            return first, second
        assert run(go()) == ((402, "out_of_funds"), (200, "ok"))
        assert book.payments["node"].amount_for(MODEL) > 1
        assert total_sats(wallet, node) == START

    def test_change_in_the_head_of_a_cut_body_is_kept(self, wallet, node):
        node.xcashu_cut_body = True
        book = payments(wallet, node, "xcashu")

        exchange = Attempt()

        async def go():
            result = await attempt(book, node, exchange=exchange)
            await book.close()
            return result
        assert run(go()) == (200, "body_cut")
        assert START - asyncio.run(wallet.spendable()) == math.ceil(node.charged_msats() / 1000)
        # what the ledger records as the cost of an answer whose body never came
        assert exchange.paid_msats == math.ceil(node.charged_msats() / 1000) * 1000 > 0
        assert total_sats(wallet, node) == START

    def test_change_lost_with_the_answer_is_collected_from_the_node(self, wallet, node):
        book = payments(wallet, node, "xcashu")
        payment = book.payments["node"]

        async def go():
            exchange = Attempt(stream=True)
            headers = dict((k.decode(), v.decode()) for k, v in await payment.headers(exchange))
            request = httpx.Request("POST", f"{node.url}/chat/completions", json={**CHAT, "stream": True})
            body = request.read()
            with socket.create_connection(("127.0.0.1", node.port)) as raw:  # sent, then the answer is lost
                raw.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Cashu: {headers['x-cashu']}\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
                for _ in range(200):  # the node took the token (asked before that, it has no refund: 404)
                    if node.xcashu_earned_msats:
                        break
                    await asyncio.sleep(0.02)
            payment.finished(exchange, "no_response")
            await book.close()
        run(go())
        assert node.charged_msats() > 0
        assert START - asyncio.run(wallet.spendable()) == math.ceil(node.charged_msats() / 1000)
        assert total_sats(wallet, node) == START

    def test_a_node_that_is_down_costs_nothing(self, wallet, node):
        book = payments(wallet, node, "xcashu")
        node.stop()

        async def go():
            result = await attempt(book, node)
            await book.close()
            return result
        assert run(go()) == (0, "refused")
        assert asyncio.run(wallet.spendable()) == START


class TestWalletKey:
    def test_a_key_is_made_on_first_use_topped_up_on_402_and_refunded(self, wallet, node):
        book = payments(wallet, node, "wallet", key_funding_sats=5)

        async def go():
            first = await attempt(book, node)  # 5 sats cannot cover the reservation: 402
            await book.tasks.drain()  # the top-up after it
            second = await attempt(book, node)
            key = await book.payments["node"].key()
            on_node = node.balance_of(key)
            refunded = await book.close()
            return first, second, on_node, refunded
        first, second, on_node, refunded = run(go())
        assert first == (402, "out_of_funds") and second == (200, "ok")
        assert on_node > 5000 and refunded == on_node // 1000
        assert node.balances_msats() == 0
        assert total_sats(wallet, node) == START

    def test_an_idle_key_is_refunded_and_a_new_one_made_when_needed(self, wallet, node):
        book = payments(wallet, node, "wallet", refund_after=1.0)

        async def go():
            await attempt(book, node)
            kept = await book.refund_idle()  # just used: not idle
            refunded = await book.refund_idle(now=book.payments["node"].last_used + 2)
            again = await attempt(book, node)
            await book.close()
            return kept, refunded, again
        kept, refunded, again = run(go())
        assert kept == 0 and refunded > 0 and again == (200, "ok")
        assert total_sats(wallet, node) == START


    def test_a_refund_whose_answer_was_lost_is_asked_again_and_its_key_never_used(self, wallet, node,
                                                                                   monkeypatch):
        from arbstr import funding
        book = payments(wallet, node, "wallet")
        real_call = funding._call

        async def answer_lost(method, url, what, **kwargs):
            response = await real_call(method, url, what, **kwargs)
            if url.endswith("/balance/refund"):
                # The node paid the key out; its answer, the token, never arrives.
                raise WalletError("the node is unreachable for a refund", status=503, code="node_unreachable")
            return response

        async def go():
            await attempt(book, node)
            old = await book.payments["node"].key()
            held = node.balance_of(old)
            monkeypatch.setattr(funding, "_call", answer_lost)
            with pytest.raises(WalletError):
                await book.payments["node"].refund()
            monkeypatch.setattr(funding, "_call", real_call)
            states = [k.state for k in await wallet.keys(states=("active", "refunding"))]
            again = await attempt(book, node)  # a new key: the one being refunded must stay empty
            new = await book.payments["node"].key()
            recovered = await funding.finish_refunds(wallet)  # what a restart does
            await book.close()
            return old, held, states, again, new, recovered
        old, held, states, again, new, recovered = run(go())
        assert states == ["refunding"] and again == (200, "ok") and new != old
        assert recovered == held // 1000 > 0
        assert node.balances_msats() == 0
        assert total_sats(wallet, node) == START

    def test_a_key_whose_token_never_reached_the_node_is_not_used_after_a_restart(self, wallet):
        async def go():
            out = await wallet.send(7, "pay", "node", purpose="key")
            await wallet.remember_key("node", "http://127.0.0.1:9/v1", key_for_token(out.token), 0)
            # ...and arbstr dies before the token is sent
            report = await wallet.reconcile()
            return report, await wallet.keys(), await wallet.keys(states=("void",))
        report, usable, void = run(go())
        assert report.reclaimed_sats == 7 and usable == [] and len(void) == 1
        assert asyncio.run(wallet.spendable()) == START

    @pytest.mark.parametrize("mint_swapped", [False, True], ids=["before-the-mint-swapped", "after-it-swapped"])
    def test_a_refund_cut_off_after_its_token_came_is_finished_by_the_exit_refund(self, wallet, node, monkeypatch,
                                                                                   mint_swapped):
        """Shutting down cancels the idle-refund loop wherever it is: here after the node's refund
        token was written down (`incoming`), while it is swapped into the wallet's own proofs
        (before the mint did the swap, or after it did and before its signatures were stored).
        The exit refund asks the node again, gets the same token back, and must finish that swap
        then: not leave the token for the next start, and not lose what the mint already signed."""
        from arbstr.wallet import MintClient
        book = payments(wallet, node, "wallet")
        swapping = asyncio.Event()

        class CutClient(MintClient):
            """The wallet's mint client (not the node's) whose swap never returns."""

            async def swap(self, inputs, outputs):
                signed = await super().swap(inputs, outputs) if mint_swapped else None
                swapping.set()
                await asyncio.Event().wait()  # cancelled here
                return signed

        async def go():
            await attempt(book, node)
            monkeypatch.setattr(wallet, "client", lambda mint=None: CutClient(mint or wallet.primary))
            refunding = asyncio.create_task(book.payments["node"].refund())
            await swapping.wait()
            refunding.cancel()
            await asyncio.gather(refunding, return_exceptions=True)
            monkeypatch.undo()
            return await book.close(), await wallet.history()
        refunded, history = run(go())
        assert refunded > 0
        assert node.balances_msats() == 0
        assert total_sats(wallet, node) == START
        assert not [entry for entry in history if entry["kind"] == "lost"], history


def run(coroutine):
    return asyncio.run(coroutine)


class TestPayability:
    def test_an_xcashu_token_bigger_than_the_wallet_is_known_before_sending(self, wallet, node):
        book = payments(wallet, node, "xcashu")
        assert wallet.known_spendable == START and book.unpayable(MODEL, ["node", "keyed"]) == {}
        book.payments["node"].reservation_sats[MODEL] = START + 7  # learned from a 402
        found = book.unpayable(MODEL, ["node", "keyed"])
        assert list(found) == ["node"] and found["node"].shortfall_sats == 7
        assert f"needs {START + 7} sats" in found["node"].reason and "7 sats short" in found["node"].reason
        assert book.unpayable("another-model", ["node"]) == {}

    def test_a_key_to_make_needs_its_funding_and_a_key_made_needs_nothing(self, wallet, node):
        book = payments(wallet, node, "wallet", key_funding_sats=START + 1)

        async def go():
            unknown = book.unpayable(MODEL, ["node"])  # before the start read the keys: not held against it
            await book.payments["node"].load()
            without_key = book.unpayable(MODEL, ["node"])
            await wallet.remember_key("node", node.url, "sk-made-by-an-earlier-run", 20)
            again = payments(wallet, node, "wallet", key_funding_sats=START + 1)
            await again.payments["node"].load()
            return unknown, without_key, again.unpayable(MODEL, ["node"])
        unknown, without_key, with_key = run(go())
        assert unknown == {} and with_key == {}
        assert without_key["node"].shortfall_sats == 1

    def test_a_key_the_node_does_not_know_is_set_aside_when_refunded(self, wallet, node):
        book = payments(wallet, node, "wallet")

        async def go():
            await wallet.remember_key("node", node.url, "sk-never-made-at-the-node", 0)
            refunded = await book.payments["node"].refund()
            return refunded, await wallet.keys(), await wallet.keys(states=("void",))
        refunded, held, void = run(go())
        assert refunded == 0 and held == [] and [k.api_key for k in void] == ["sk-never-made-at-the-node"]
        assert not book.payments["node"].holds_keys()  # nothing to ask again

    def test_a_node_of_another_mint_is_never_payable(self, wallet, node):
        book = payments(wallet, node, "xcashu")
        node.advertised_mints = ["https://another-mint.example"]
        run(book.check_mints())
        found = book.unpayable(MODEL, ["node"])
        assert found["node"].shortfall_sats is None and "another-mint.example" in found["node"].reason

    def test_the_known_balance_follows_every_step(self, wallet):
        async def go():
            out = await wallet.send(25, "pay", "node")
            after_send = wallet.known_spendable
            await wallet.reclaim(out.operation)
            return after_send, wallet.known_spendable
        assert run(go()) == (START - 25, START)


async def pay_then_lose_the_answer(book: WalletPayments, node: CashuNode) -> None:
    """An X-Cashu request the node answers with change, after which arbstr "dies" (nothing more of it runs)."""
    exchange = Attempt()
    headers = {k.decode(): v.decode() for k, v in await book.payments["node"].headers(exchange)}
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{node.url}/chat/completions", json=CHAT, headers=headers)
    assert answer.status_code == 200 and "x-cashu" in answer.headers


def restart_and_reconcile(tmp_path, cashu_mint, node: CashuNode):
    """arbstr's start after the crash: the same wallet database reconciled, change asked of the node."""
    from arbstr.funding import collect_change

    async def go():
        ledger = Ledger(str(tmp_path / "wallet.db"), flush_interval=0)
        try:
            again = Wallet(ledger, [cashu_mint.url])
            report = await again.reconcile(lambda op, token: collect_change(again, op.provider, node.url, token))
            return report, await again.history()
        finally:
            ledger.close()
    return run(go())


def test_a_crash_between_paying_and_storing_the_change_is_recovered_at_restart(wallet, node, tmp_path, cashu_mint):
    run(pay_then_lose_the_answer(payments(wallet, node, "xcashu"), node))
    report, _ = restart_and_reconcile(tmp_path, cashu_mint, node)
    assert report.settled_sats == 50 and report.changes_lost == 0
    assert total_sats(wallet, node) == START
    assert START - asyncio.run(wallet.spendable()) == math.ceil(node.charged_msats() / 1000)


def test_change_no_node_gives_back_is_counted_and_reported_as_lost(wallet, node, tmp_path, cashu_mint, caplog,
                                                                   monkeypatch):
    from arbstr import funding
    monkeypatch.setattr(funding, "CHANGE_PENDING_WAIT", 0.01)  # its 404 is asked again, to no avail
    run(pay_then_lose_the_answer(payments(wallet, node, "xcashu"), node))
    node._change.clear()  # a node that keeps no change for its refund endpoint
    report, history = restart_and_reconcile(tmp_path, cashu_mint, node)
    change = 50 - math.ceil(node.charged_msats() / 1000)
    assert report.settled_sats == 50 and report.changes_lost == 1 and change > 0
    lost = [e for e in history if e["kind"] == "lost"]
    assert len(lost) == 1 and lost[0]["provider"] == "node" and "50-sat X-Cashu payment" in lost[0]["note"]
    assert "is lost" in caplog.text and "cashuB" not in caplog.text
    assert total_sats(wallet, node) == START - change  # exactly the change, and it was said
