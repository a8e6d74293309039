"""How a provider is paid from the wallet: the two `Payment`s an exchange asks for credentials.

- `WalletKeyPayment` (`payment = "wallet"`): a key at the node made from a wallet token the first
  time the provider is used, topped up after a 402 (what the node lacked, with headroom), and
  refunded into the wallet when idle (`refund_after`) and at shutdown. Requests carry only the key,
  so streams stay streams and a request costs nothing more than with a key you funded yourself.
- `XCashuPayment` (`payment = "xcashu"`): a token with every request (`X-Cashu`); the node's change
  comes back in the `X-Cashu` response header and is written down before the response goes on,
  even when the body that follows fails. On today's nodes X-Cashu streams arrive all at once.

Both write every token down (pending, provider, amount, request id) before it is sent (the
wallet's `send` does), so a crash at any point is settled by the wallet's reconcile at start.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from arbstr.errors import WalletError
from arbstr.funding import accepted_mints, collect_change, fund_key, refund_key
from arbstr.router import Unpayable
from arbstr.wallet import OutgoingToken, Wallet, parse_token

log = logging.getLogger("arbstr.payment")

NEVER_SENT = frozenset({"refused", "connect", "connect_timeout"})
"""End states in which the request (and its token) cannot have reached the node."""
_SHORTFALL = re.compile(r"\((\d+) msats\) required.*?\((\d+) msats\) available", re.S)
_REQUIRED = re.compile(r"amount_required_msat\D+(\d+)")


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in headers if k.lower() == name), None)


def _request_id(exchange: Any) -> str | None:
    return getattr(exchange.request, "request_id", None)


class _Tasks:
    """Background work a payment starts from `finished()` (which may not wait), kept until done."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task] = set()

    def spawn(self, work: Coroutine, what: str) -> None:
        task = asyncio.get_running_loop().create_task(self._logged(work, what))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    @staticmethod
    async def _logged(work: Coroutine, what: str) -> None:
        try:
            await work
        except WalletError as exc:
            log.warning("wallet: %s failed: %s (reconcile at the next start settles it)", what, exc.message)
        except Exception:
            log.exception("wallet: %s failed (reconcile at the next start settles it)", what)

    async def drain(self) -> None:
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)


class _FromWallet:
    """What both wallet payments share: the provider, and whether it takes the wallet's ecash."""

    refusal: str | None = None
    """Why the wallet cannot pay this provider at all (it does not take the wallet's mint), if so."""

    def _check_accepted(self) -> None:
        if self.refusal:
            raise WalletError(self.refusal, code="mint_not_accepted")


class WalletKeyPayment(_FromWallet):
    """A key at the node funded from the wallet, made on first use and refunded when idle."""

    def __init__(self, wallet: Wallet, provider: str, base_url: str, funding_sats: int,
                 headroom: Decimal, tasks: _Tasks) -> None:
        self.wallet, self.provider, self.base_url = wallet, provider, base_url
        self.funding_sats, self.headroom = funding_sats, headroom
        self._tasks = tasks
        self._key: str | None = None
        self._loaded = False
        self._lock = asyncio.Lock()
        self._topping_up = False
        self._unrefunded = False
        """A refund the node refused for now (a request still running on the key): asked again later."""
        self.last_used = time.monotonic()

    async def load(self) -> None:
        """The key an earlier run made here, if any (so that routing knows whether paying this
        provider needs wallet money)."""
        async with self._lock:
            await self._load()

    async def _load(self) -> None:
        if not self._loaded:
            known = await self.wallet.keys(self.provider, ("active",))
            self._key = known[-1].api_key if known else None
            self._loaded = True

    def wallet_needs(self, model: str) -> int:
        """Sats the wallet must hold for this provider's next request: a new key's funding when
        there is no key (a key's own balance pays, or its 402 gets a top-up)."""
        return self.funding_sats if self._loaded and self._key is None else 0

    async def key(self, request_id: str | None = None) -> str:
        async with self._lock:
            await self._load()
            if self._key is None:
                self._key = await fund_key(self.wallet, self.provider, self.base_url, self.funding_sats,
                                           request_id=request_id)
            return self._key

    def holds_keys(self) -> bool:
        """Whether a key may hold sats at the node (unknown until the keys were read: then yes)."""
        return self._key is not None or not self._loaded or self._unrefunded

    async def headers(self, exchange: Any) -> list[tuple[bytes, bytes]]:
        self._check_accepted()
        self.last_used = time.monotonic()
        key = await self.key(_request_id(exchange))
        return [(b"authorization", b"Bearer " + key.encode())]

    async def received(self, exchange: Any, status: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
        pass

    def finished(self, exchange: Any, state: Any) -> None:
        self.last_used = time.monotonic()
        if str(state) == "out_of_funds" and self._key is not None and not self._topping_up:
            self._topping_up = True
            self._tasks.spawn(self._top_up(self.topup_sats(getattr(exchange.attempt, "detail", "") or ""),
                                           getattr(exchange, "health", None)),
                              f"topping up the key at {self.provider}")
        elif str(state) == "auth_failed" and self._key is not None:
            # The node does not know the key any more: its balance is gone with it; make a new one.
            log.warning("wallet: %s no longer accepts the wallet's key; a new one is made on next use", self.provider)
            self._tasks.spawn(self.wallet.mark_key(self._key, "void"), "forgetting a dead key")
            self._key = None

    def topup_sats(self, detail: str) -> int:
        """What a top-up adds after a 402: the shortfall the node named, with headroom, at least the
        funding amount."""
        found = _SHORTFALL.search(detail)
        if not found:
            return self.funding_sats
        lacking_msats = int(found.group(1)) - int(found.group(2))
        return max(self.funding_sats, math.ceil(Decimal(lacking_msats) * self.headroom / 1000))

    async def _top_up(self, sats: int, health: Any) -> None:
        try:
            async with self._lock:
                if self._key is not None:
                    await fund_key(self.wallet, self.provider, self.base_url, sats, api_key=self._key)
                    if health is not None:
                        health.record_funded(self.provider)
        finally:
            self._topping_up = False

    async def refund(self) -> int:
        """Pay the balance of every wallet-funded key at this node back into the wallet (idle, or
        shutting down), including keys an earlier run made and never refunded."""
        async with self._lock:
            self._key, self._loaded = None, True
            total, failed = 0, None
            for key in await self.wallet.keys(self.provider):
                try:
                    total += await refund_key(self.wallet, self.provider, key.url, key.api_key)
                except WalletError as exc:
                    failed = exc
            self._unrefunded = failed is not None
            if failed is not None:
                raise failed
            return total


@dataclass
class _Flight:
    """One X-Cashu request: its token, and the change operation once the node handed some back."""

    paid: OutgoingToken
    request_id: str | None
    change: int | None = None
    status: int | None = None
    settled: bool = False
    extra: dict = field(default_factory=dict)


class XCashuPayment(_FromWallet):
    """A wallet token with each request; the change from the `X-Cashu` response header."""

    def __init__(self, wallet: Wallet, provider: str, base_url: str, first_sats: int, tasks: _Tasks) -> None:
        self.wallet, self.provider, self.base_url = wallet, provider, base_url
        self.first_sats = first_sats
        self._tasks = tasks
        self.reservation_sats: dict[str, int] = {}
        """What the node reserves per model, learned from its 402s."""
        self._flights: dict[int, _Flight] = {}

    def amount_for(self, model: str) -> int:
        return self.reservation_sats.get(model, self.first_sats)

    def wallet_needs(self, model: str) -> int:
        """Sats the wallet must hold for this provider's next request: the token it sends."""
        return self.amount_for(model)

    async def headers(self, exchange: Any) -> list[tuple[bytes, bytes]]:
        self._check_accepted()
        request_id = _request_id(exchange)
        paid = await self.wallet.send(self.amount_for(exchange.request.model), "pay", self.provider, request_id,
                                      purpose="xcashu")
        self._flights[id(exchange)] = _Flight(paid, request_id)
        return [(b"x-cashu", paid.token.encode())]

    async def received(self, exchange: Any, status: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
        flight = self._flights.get(id(exchange))
        if flight is None:
            return
        flight.status = status
        change = _header(headers, b"x-cashu")
        if change:
            # Written down before the response goes on; swapped into our own proofs afterwards.
            flight.change = await self.wallet.accept(change, "change", self.provider, flight.request_id)
        if change or 200 <= status < 300 or status >= 500:
            await self.wallet.settle(flight.paid.operation, "paid per request")
            flight.settled = True
            # The token is the node's; what it did not hand back as change is what the answer cost
            # (all of it when no change came: routstr-core keeps a token whose answer it cut off).
            back = parse_token(change).amount_sats if change else 0
            exchange.paid_msats = max(0, flight.paid.amount_sats - back) * 1000

    def finished(self, exchange: Any, state: Any) -> None:
        flight = self._flights.pop(id(exchange), None)
        if flight is None:
            return
        if str(state) == "out_of_funds":
            required = _REQUIRED.search(getattr(exchange.attempt, "detail", "") or "")
            model = exchange.request.model
            # With headroom: a longer prompt raises the node's reservation, and the change comes back.
            self.reservation_sats[model] = (math.ceil(int(required.group(1)) * 3 / 2000) if required
                                            else 2 * self.amount_for(model))
            if getattr(exchange, "health", None) is not None:
                exchange.health.record_funded(self.provider)  # the next request brings enough
        self._tasks.spawn(self._settle(flight, str(state)), f"settling an X-Cashu payment to {self.provider}")

    async def _settle(self, flight: _Flight, state: str) -> None:
        if flight.change is not None:
            await self.wallet.redeem(flight.change)
        if flight.settled:
            return
        if state in NEVER_SENT or flight.status in (400, 401, 402):
            await self.wallet.reclaim(flight.paid.operation)  # not taken; the mint says for sure
            return
        # No answer came: the mint says whether the node took the token (if not, it is swapped back
        # whole, and the node can no longer take it); if it did, its change is asked of the node.
        if await self.wallet.reclaim(flight.paid.operation) > 0:
            return
        await self.wallet.collect_owed(flight.paid.operation, lambda: collect_change(
            self.wallet, self.provider, self.base_url, flight.paid.token, flight.request_id))


class WalletPayments:
    """The wallet-paid providers of a config: their payments, the idle-key refunds, shutdown."""

    def __init__(self, wallet: Wallet, providers: Sequence[tuple[str, str, str]], *, refund_after: float,
                 key_funding_sats: int, topup_headroom: Decimal, xcashu_sats: int) -> None:
        """`providers`: (name, base URL, payment) for each provider paid from the wallet."""
        self.wallet = wallet
        self.refund_after = refund_after
        self.tasks = _Tasks()
        self.payments: dict[str, WalletKeyPayment | XCashuPayment] = {}
        for name, url, payment in providers:
            if payment == "wallet":
                self.payments[name] = WalletKeyPayment(wallet, name, url, key_funding_sats, topup_headroom, self.tasks)
            elif payment == "xcashu":
                self.payments[name] = XCashuPayment(wallet, name, url, xcashu_sats, self.tasks)

    def unpayable(self, model: str, providers: Sequence[str]) -> dict[str, Unpayable]:
        """Which of `providers` the wallet cannot pay for a request of `model` now, with why: for
        routing, before anything is sent (a key-paid provider is always payable)."""
        spendable = self.wallet.known_spendable
        found = {}
        for name in providers:
            payment = self.payments.get(name)
            if payment is None:
                continue
            if payment.refusal:
                found[name] = Unpayable(payment.refusal)
            elif (need := payment.wallet_needs(model)) > spendable:
                found[name] = Unpayable(f"paying it needs {need} sats from the wallet, which holds {spendable} "
                                        f"({need - spendable} sats short)", need - spendable)
        return found

    async def check_mints(self) -> None:
        """Ask each wallet-paid node which mints it takes (`/v1/info`): one that does not take the
        wallet's is never paid from it (routing leaves it out)."""
        async def check(name: str, payment: _FromWallet) -> None:
            try:
                mints = await accepted_mints(payment.base_url)
            except WalletError as exc:
                log.info("wallet: cannot ask %s which mints it takes (%s); paying it as if it took ours",
                         name, exc.message)
                return
            if mints and self.wallet.primary not in mints:
                payment.refusal = (f"{name} takes ecash from {', '.join(mints)}, not from the wallet's mint "
                                   f"{self.wallet.primary}")
                log.warning("wallet: %s", payment.refusal)
            else:
                payment.refusal = None
        await asyncio.gather(*(check(name, p) for name, p in self.payments.items()))

    async def load_keys(self) -> None:
        """The keys earlier runs made, read once the start's reconcile settled what they came from."""
        await asyncio.gather(*(p.load() for p in self.payments.values() if isinstance(p, WalletKeyPayment)))

    async def refund_idle(self, now: float | None = None, every: bool = False) -> int:
        """Refund the keys idle for `refund_after`; `every`: each wallet-funded key the database says
        may hold sats, whatever this run knows of it (shutting down)."""
        now = time.monotonic() if now is None else now
        total = 0
        for payment in self.payments.values():
            if (isinstance(payment, WalletKeyPayment) and now - payment.last_used >= self.refund_after
                    and (every or payment.holds_keys())):
                try:
                    total += await payment.refund()
                except WalletError as exc:
                    log.warning("wallet: refunding the idle key at %s failed: %s", payment.provider, exc.message)
        return total

    async def refund_idle_forever(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.refund_after / 4))
            await self.refund_idle()

    async def close(self) -> int:
        """Settle what is in flight, then refund every wallet-funded key (shutting down)."""
        await self.tasks.drain()
        # Every key, not only those this run holds: a key an earlier run left mid-refund is in the
        # database alone, and the refund reads the database (an empty key costs one node call).
        return await self.refund_idle(now=math.inf, every=True)
