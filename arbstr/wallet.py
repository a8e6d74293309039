"""One Cashu wallet that pays every provider: proofs in arbstr's database, the mint spoken to over NUTs.

Built on the `cashu` library (nutshell): its blind-signature crypto (`b_dhke`), its proof and
token types and its amount split; nothing of that is written here. Its wallet class is not used:
it keeps proofs in a database of its own and its HTTP client needs an httpx older than
mitmproxy's. Here the proofs live in arbstr's database (`walletstore`) and the money path is
durable: every step writes what it is about to do before it does it, so `reconcile()` at start
can finish or undo whatever a crash interrupted:
- a token handed out is written first (operation `pending`, its proofs `reserved`, with provider,
  amount and request id), and only then returned to be sent;
- a token received (a node's change) is written as `incoming` before anything else happens to
  it, then swapped into proofs only this wallet knows;
- blinded outputs are written before the mint is asked to sign them, so signatures a crash lost
  come back through NUT-09 restore.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

import httpx
import peewee

from arbstr.errors import InsufficientFunds, WalletError
from arbstr.store import Ledger
from arbstr.walletstore import WalletEvent, WalletKey, WalletOperation, WalletOutput, WalletProof, now, open_wallet_tables

_tracebacklimit = getattr(sys, "tracebacklimit", None)
try:
    from cashu.core.base import BlindedMessage, BlindedSignature, Proof, TokenV3, TokenV4, TokenV4Proof, TokenV4Token
    from cashu.core.crypto.b_dhke import step1_alice, step3_alice
    from cashu.core.crypto.secp import PrivateKey, PublicKey
    from cashu.core.split import amount_split
    from loguru import logger as _loguru
    _loguru.disable("cashu")  # nutshell logs proofs at debug level: tokens never reach a log
except ImportError as exc:  # the wallet is optional: arbstr without [wallet] never imports this module
    raise ImportError(f"the Cashu wallet needs the `cashu` package ({exc}): run `make install`, "
                      "or see README (Wallet) for the pip commands") from exc
finally:
    # nutshell sets sys.tracebacklimit = 0 when it is imported; arbstr's own errors need their tracebacks.
    if _tracebacklimit is None:
        sys.__dict__.pop("tracebacklimit", None)
    else:
        sys.tracebacklimit = _tracebacklimit

log = logging.getLogger("arbstr.wallet")
T = TypeVar("T")

SPENT_CODES = {11001}
"""NUT error code a mint answers for inputs already spent."""
QUOTE_WAIT = 30.0
KEYS_HOLDING = ("active", "refunding")
"""States of a wallet-funded key that may still hold sats at its node."""
ACTIVE_KEYSET_TTL = 300.0
"""Seconds the active keyset of a mint is trusted before asking again (mints rotate them rarely)."""


def normalize_mint_url(url: str) -> str:
    return url.strip().rstrip("/")


def key_for_token(token: str) -> str:
    """The key a Routstr node makes from a token (`/v1/balance/create`, or the token used as Bearer)."""
    return "sk-" + hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ParsedToken:
    mint: str
    unit: str
    proofs: list[Proof]

    @property
    def amount_sats(self) -> int:
        return sum(p.amount for p in self.proofs)


def parse_token(token: str) -> ParsedToken:
    """A `cashuA`/`cashuB` token's mint and proofs; WalletError (never the token) when it is not one."""
    token = token.strip()
    try:
        if token.startswith("cashuB"):
            parsed = TokenV4.deserialize(token)
            return ParsedToken(normalize_mint_url(parsed.mint), parsed.unit or "sat", parsed.proofs)
        if token.startswith("cashuA"):
            parsed = TokenV3.deserialize(token)
            if len(parsed.mints) != 1:
                raise ValueError("a token must come from exactly one mint")
            return ParsedToken(normalize_mint_url(parsed.mints[0]), parsed.unit or "sat", parsed.proofs)
    except Exception as exc:
        raise WalletError(f"not a valid Cashu token ({type(exc).__name__})", status=400,
                          code="invalid_token") from None
    raise WalletError("not a Cashu token (it must start with cashuA or cashuB)", status=400, code="invalid_token")


def serialize_token(mint: str, proofs: Iterable[Proof]) -> str:
    by_keyset: dict[str, list[Proof]] = {}
    for proof in proofs:
        by_keyset.setdefault(proof.id, []).append(proof)
    return TokenV4(m=mint, u="sat", t=[
        TokenV4Token(i=bytes.fromhex(keyset), p=[TokenV4Proof(a=p.amount, s=p.secret, c=bytes.fromhex(p.C))
                                                 for p in group])
        for keyset, group in by_keyset.items()]).serialize()


def _listed_keyset(listed: list[dict], keyset_id: str, mint: str) -> dict:
    """The mint's listing of `keyset_id`, found by its full id or, for a short one, as the one id it
    starts; {} when the mint does not list it (its keys are then asked for by that id)."""
    exact = [k for k in listed if k.get("id") == keyset_id]
    if exact:
        return exact[0]
    starting = [k for k in listed if str(k.get("id", "")).startswith(keyset_id)]
    if len(starting) > 1:
        raise WalletError(f"mint {mint} lists {len(starting)} keysets whose ids start {keyset_id}")
    return starting[0] if starting else {}


class MintRefused(WalletError):
    """The mint answered with an error (NUT error `mint_code`), so nothing happened there."""

    def __init__(self, message: str, mint_code: int | None) -> None:
        super().__init__(message, code="mint_refused")
        self.mint_code = mint_code


@cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every mint call: building one costs ~0.2 s of CPU."""
    return ssl.create_default_context()


class MintClient:
    """The NUT endpoints a wallet uses, over httpx (one short-lived client per call: loop-agnostic)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = normalize_mint_url(url)
        self.timeout = timeout

    async def _call(self, method: str, path: str, payload: dict | None = None) -> Any:
        try:
            async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout, verify=_tls()) as client:
                response = await client.request(method, path, json=payload)
        except httpx.HTTPError as exc:
            raise WalletError(f"mint {self.url} unreachable: {type(exc).__name__}", status=503,
                              code="mint_unreachable") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400 or body is None:
            detail = body.get("detail") if isinstance(body, dict) else response.text[:200]
            code = body.get("code") if isinstance(body, dict) else None
            raise MintRefused(f"mint {self.url} refused {path}: {detail}", code if isinstance(code, int) else None)
        return body

    async def keysets(self) -> list[dict]:
        return (await self._call("GET", "/v1/keysets"))["keysets"]

    async def keys(self, keyset_id: str) -> dict[int, PublicKey]:
        body = await self._call("GET", f"/v1/keys/{keyset_id}")
        keyset = next(k for k in body["keysets"] if k["id"] == keyset_id)
        return {int(amount): PublicKey(bytes.fromhex(key)) for amount, key in keyset["keys"].items()}

    async def mint_quote(self, amount: int) -> dict:
        return await self._call("POST", "/v1/mint/quote/bolt11", {"unit": "sat", "amount": amount})

    async def quote_state(self, quote: str) -> dict:
        return await self._call("GET", f"/v1/mint/quote/bolt11/{quote}")

    async def mint(self, quote: str, outputs: list[BlindedMessage]) -> list[BlindedSignature]:
        body = await self._call("POST", "/v1/mint/bolt11",
                                {"quote": quote, "outputs": [o.model_dump(exclude={"C_"}) for o in outputs]})
        return [BlindedSignature(**s) for s in body["signatures"]]

    async def swap(self, inputs: list[Proof], outputs: list[BlindedMessage]) -> list[BlindedSignature]:
        body = await self._call("POST", "/v1/swap", {
            "inputs": [{"id": p.id, "amount": p.amount, "secret": p.secret, "C": p.C} for p in inputs],
            "outputs": [o.model_dump(exclude={"C_"}) for o in outputs]})
        return [BlindedSignature(**s) for s in body["signatures"]]

    async def check_state(self, proofs: list[Proof]) -> list[str]:
        """NUT-07: UNSPENT, PENDING or SPENT for each proof, in order."""
        body = await self._call("POST", "/v1/checkstate", {"Ys": [p.Y for p in proofs]})
        states = {s["Y"]: s["state"] for s in body["states"]}
        return [states.get(p.Y, "UNSPENT") for p in proofs]

    async def restore(self, outputs: list[BlindedMessage]) -> dict[str, BlindedSignature]:
        """NUT-09: the signatures the mint already gave for these outputs, by blinded message."""
        body = await self._call("POST", "/v1/restore", {"outputs": [o.model_dump(exclude={"C_"}) for o in outputs]})
        return {o["B_"]: BlindedSignature(**s) for o, s in zip(body.get("outputs", []), body.get("signatures", []))}


@dataclass(frozen=True, slots=True)
class Keyset:
    id: str
    input_fee_ppk: int
    keys: dict[int, PublicKey]

    def fee(self, inputs: int) -> int:
        return math.ceil(inputs * self.input_fee_ppk / 1000)


@dataclass(frozen=True, slots=True)
class OutgoingToken:
    """A token written down as pending before anyone sees it: `operation` settles or reclaims it."""

    operation: int
    token: str
    amount_sats: int
    mint: str


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    finished: int = 0
    """Interrupted swaps and mints carried to their end."""
    reclaimed_sats: int = 0
    """Pending tokens nobody redeemed, swapped back into the wallet."""
    settled_sats: int = 0
    """Pending tokens a node did redeem (now counted as paid)."""
    changes_lost: int = 0
    """X-Cashu payments whose change, lost with the answer, the node did not give back (each one a
    `lost` event in the history)."""


def _proof(row: WalletProof) -> Proof:
    return Proof(id=row.keyset_id, amount=row.amount_sats, secret=row.secret, C=row.signature)


def _set_op(op_id: int, state: str) -> None:
    WalletOperation.update(state=state, updated_at=now()).where(WalletOperation.id == op_id).execute()


def _event(kind: str, amount: int, mint: str, provider: str | None = None, request_id: str | None = None,
           note: str = "") -> None:
    WalletEvent.create(timestamp=now(), kind=kind, amount_sats=amount, mint=mint, provider=provider,
                       request_id=request_id, note=note)


RECEIVED_BEFORE = "received_before"
"""A received token's operation (`purpose`) and history entry when the wallet had taken it in already."""


def _change_came(op: WalletOperation) -> bool:
    """Database thread: whether change for the payment `op` was received after all (its answer
    arrived and was written down, and the run died before the payment was settled)."""
    return op.request_id is not None and WalletOperation.select().where(
        (WalletOperation.kind == "change") & (WalletOperation.provider == op.provider)
        & (WalletOperation.request_id == op.request_id) & (WalletOperation.id > op.id)).exists()


def choose_proofs(amounts: list[tuple[int, int]], target: int) -> tuple[list[int], bool]:
    """Proof ids (id, amount) adding up to exactly `target` when possible (True), else the fewest
    largest ones covering it (False, to be swapped); [] when they cannot cover it."""
    ordered = sorted(amounts, key=lambda item: -item[1])
    exact, left = [], target
    for proof_id, amount in ordered:
        if amount <= left:
            exact.append(proof_id)
            left -= amount
    if left == 0:
        return exact, True
    cover, total = [], 0
    for proof_id, amount in ordered:
        if total >= target:
            break
        cover.append(proof_id)
        total += amount
    return (cover, False) if total >= target else ([], False)


class Wallet:
    """The wallet over `ledger`'s database; `mints` are the trusted mints, the first one pays."""

    def __init__(self, ledger: Ledger, mints: list[str]) -> None:
        if not mints:
            raise WalletError("the wallet trusts no mint: list at least one in [wallet] mints", code="config_error")
        self.ledger = ledger
        self.mints = [normalize_mint_url(m) for m in mints]
        self.primary = self.mints[0]
        self._keysets: dict[tuple[str, str], Keyset] = {}
        self._active: dict[str, tuple[float, str]] = {}
        self._lock: asyncio.Lock | None = None
        self.known_spendable = 0
        """Sats the primary mint's proofs hold, as of the wallet's last step (any read or write of
        its tables): what routing plans with, without a database read per request."""

        def start() -> None:
            open_wallet_tables(ledger.db)
            self._note_spendable()
        ledger.call(start)

    def _note_spendable(self) -> None:
        """Database thread: `known_spendable` read again."""
        total = (WalletProof.select(peewee.fn.SUM(WalletProof.amount_sats))
                 .where((WalletProof.mint == self.primary) & (WalletProof.state == "unspent")).scalar())
        self.known_spendable = int(total or 0)

    async def _db(self, function: Callable[[], T]) -> T:
        """Run `function` in one transaction on the database thread."""
        db = self.ledger

        def atomic() -> T:
            with db.db.atomic():
                result = function()
                self._note_spendable()
                return result
        return await asyncio.wrap_future(db.submit(atomic))

    def _guard(self) -> asyncio.Lock:
        # Spends of one wallet are serialized: two of them choosing the same proofs would each
        # fail at the mint. Created on first use, inside the event loop that uses it.
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def client(self, mint: str | None = None) -> MintClient:
        return MintClient(mint or self.primary)

    async def keyset(self, mint: str, keyset_id: str | None = None) -> Keyset:
        """A keyset of `mint` with its keys: the given one, else the active sat keyset. A short id (a
        version-2 id's first 8 bytes, as tokens may carry it, NUT-02) finds the keyset it starts; the
        Keyset always has the full id, the one the mint answers to."""
        client = self.client(mint)
        if keyset_id is None and (active := self._active.get(mint)) and time.monotonic() - active[0] < ACTIVE_KEYSET_TTL:
            keyset_id = active[1]
        if keyset_id is None or (mint, keyset_id) not in self._keysets:
            listed = await client.keysets()
            if keyset_id is None:
                active = [k for k in listed if k["unit"] == "sat" and k["active"]]
                if not active:
                    raise WalletError(f"mint {mint} has no active sat keyset")
                keyset_id = active[0]["id"]
                self._active[mint] = (time.monotonic(), keyset_id)
            if (mint, keyset_id) not in self._keysets:
                entry = _listed_keyset(listed, keyset_id, mint)
                full = entry.get("id", keyset_id)
                known = self._keysets.get((mint, full)) or Keyset(full, int(entry.get("input_fee_ppk") or 0),
                                                                  await client.keys(full))
                self._keysets[(mint, full)] = self._keysets[(mint, keyset_id)] = known
        return self._keysets[(mint, keyset_id)]

    async def _full_ids(self, mint: str, proofs: list[Proof]) -> list[Proof]:
        """The proofs as the mint takes them: each naming its keyset by the full id."""
        resolved = []
        for proof in proofs:
            full = (await self.keyset(mint, proof.id)).id
            resolved.append(proof if full == proof.id else proof.copy(update={"id": full}))
        return resolved

    async def _input_fee(self, mint: str, proofs: list[Proof]) -> int:
        total_ppk = 0
        for proof in proofs:
            total_ppk += (await self.keyset(mint, proof.id)).input_fee_ppk
        return math.ceil(total_ppk / 1000)

    # -- outputs: written before the mint sees them ------------------------------------------------

    @staticmethod
    def _new_outputs(op_id: int, keyset: Keyset, amounts: list[int], keep: bool) -> list[dict]:
        rows = []
        for amount in amounts:
            secret = secrets.token_hex(32)
            blinded, r = step1_alice(secret, PrivateKey())
            rows.append({"operation": op_id, "keyset_id": keyset.id, "amount_sats": amount, "secret": secret,
                         "blinding_factor": r.to_hex(), "blinded_message": blinded.format().hex(), "keep": keep})
        return rows

    @staticmethod
    def _blinded(rows: list[WalletOutput] | list[dict]) -> list[BlindedMessage]:
        get = (lambda row, name: row[name]) if rows and isinstance(rows[0], dict) else getattr
        return [BlindedMessage(amount=get(r, "amount_sats"), id=get(r, "keyset_id"), B_=get(r, "blinded_message"))
                for r in rows]

    async def _unblind(self, mint: str, rows: list[WalletOutput],
                       signatures: dict[str, BlindedSignature]) -> list[tuple[WalletOutput, Proof]]:
        """Proofs from the mint's signatures on our outputs (outputs it did not sign are left out)."""
        made = []
        for row in rows:
            signature = signatures.get(row.blinded_message)
            if signature is None:
                continue
            keyset = await self.keyset(mint, row.keyset_id)
            C = step3_alice(PublicKey(bytes.fromhex(signature.C_)), PrivateKey.from_hex(row.blinding_factor),
                            keyset.keys[row.amount_sats])
            made.append((row, Proof(id=row.keyset_id, amount=row.amount_sats, secret=row.secret,
                                    C=C.format().hex())))
        return made

    def _store_made(self, op_id: int, mint: str, made: list[tuple[WalletOutput, Proof]], send_state: str) -> None:
        """Database thread: proofs from signed outputs (kept ones unspent, the rest `send_state` for
        the operation), the operation's inputs spent, its outputs forgotten."""
        for row, proof in made:
            WalletProof.create(mint=mint, keyset_id=proof.id, amount_sats=proof.amount, secret=proof.secret,
                               signature=proof.C, state="unspent" if row.keep else send_state,
                               operation=None if row.keep else op_id, created_at=now())
        # Spent inputs leave the operation: its proofs are then only what it hands out (token_of).
        (WalletProof.update(state="spent", operation=None)
         .where((WalletProof.operation == op_id) & WalletProof.state.in_(("reserved", "incoming"))
                & WalletProof.secret.not_in([p.secret for _, p in made]))
         .execute())
        WalletOutput.delete().where(WalletOutput.operation == op_id).execute()

    async def _swap(self, op: WalletOperation, inputs: list[Proof], send: int,
                    then: Callable[[int], None]) -> int:
        """Swap the operation's inputs (already reserved to it) into `send` sats held for it and the
        rest into unspent proofs; returns the fee paid. Outputs are written before the mint sees them;
        `then(fee)` writes the operation's next state in the same transaction as the swap's proofs,
        so a crash never leaves a swap done with its operation still looking unfinished."""
        keyset = await self.keyset(op.mint)
        inputs = await self._full_ids(op.mint, inputs)
        fee = await self._input_fee(op.mint, inputs)
        change = sum(p.amount for p in inputs) - send - fee
        if change < 0:
            raise InsufficientFunds(f"the wallet is {-change} sats short (mint fee {fee} sats)",
                                    details={"shortfall_sats": -change})
        rows = (self._new_outputs(op.id, keyset, amount_split(send), keep=False)
                + self._new_outputs(op.id, keyset, amount_split(change), keep=True))

        def write_outputs() -> list[WalletOutput]:
            WalletOutput.insert_many(rows).execute()
            _set_op(op.id, "swapping")
            return list(WalletOutput.select().where(WalletOutput.operation == op.id).order_by(WalletOutput.id))
        stored = await self._db(write_outputs)
        try:
            signatures = await self.client(op.mint).swap(inputs, self._blinded(stored))
        except MintRefused:
            await self._db(lambda: WalletOutput.delete().where(WalletOutput.operation == op.id).execute())
            raise
        made = await self._unblind(op.mint, stored, {r.blinded_message: s for r, s in zip(stored, signatures)})

        def finish() -> None:
            self._store_made(op.id, op.mint, made, "reserved")
            if fee:
                _event("fee", -fee, op.mint, op.provider, op.request_id, "mint swap fee")
            then(fee)
        await self._db(finish)
        return fee

    # -- reading ---------------------------------------------------------------------------------

    async def balance(self) -> dict[str, dict[str, int]]:
        """Per mint: `unspent` (spendable), `reserved` (in tokens out, fate unknown), `incoming`."""
        def read() -> dict[str, dict[str, int]]:
            rows = (WalletProof.select(WalletProof.mint, WalletProof.state,
                                       peewee.fn.SUM(WalletProof.amount_sats).alias("total"))
                    .where(WalletProof.state != "spent").group_by(WalletProof.mint, WalletProof.state).dicts())
            result = {mint: {"unspent": 0, "reserved": 0, "incoming": 0} for mint in self.mints}
            for row in rows:
                result.setdefault(row["mint"], {"unspent": 0, "reserved": 0, "incoming": 0})[row["state"]] = int(
                    row["total"])
            return result
        return await self._db(read)

    async def spendable(self) -> int:
        return sum(m["unspent"] for m in (await self.balance()).values())

    async def history(self, limit: int = 50) -> list[dict]:
        def read() -> list[dict]:
            rows = WalletEvent.select().order_by(WalletEvent.id.desc()).limit(limit)
            return [{"timestamp": r.timestamp, "kind": r.kind, "amount_sats": r.amount_sats, "mint": r.mint,
                     "provider": r.provider, "request_id": r.request_id, "note": r.note} for r in rows]
        return await self._db(read)

    # -- money in --------------------------------------------------------------------------------

    async def request_topup(self, amount: int) -> tuple[int, str]:
        """A Lightning invoice from the primary mint for `amount` sats: (operation, invoice)."""
        if amount <= 0:
            raise WalletError("the amount must be a positive number of sats", status=400, code="invalid_amount")
        quote = await self.client().mint_quote(amount)

        def write() -> int:
            return WalletOperation.create(kind="mint", state="quoted", mint=self.primary, amount_sats=amount,
                                          quote=quote["quote"], created_at=now(), updated_at=now()).id
        return await self._db(write), quote["request"]

    async def finish_topup(self, op_id: int, wait: float = QUOTE_WAIT) -> int:
        """Once the invoice is paid, mint its proofs; returns the sats added (0 if still unpaid)."""
        op = await self._db(lambda: WalletOperation.get_by_id(op_id))
        client = self.client(op.mint)
        deadline = asyncio.get_running_loop().time() + wait
        while (await client.quote_state(op.quote)).get("state") not in ("PAID", "ISSUED"):
            if asyncio.get_running_loop().time() > deadline:
                return 0
            await asyncio.sleep(0.5)
        return await self._mint_paid(op)

    def _finish_mint(self, op: WalletOperation, made: list[tuple[WalletOutput, Proof]]) -> None:
        self._store_made(op.id, op.mint, made, "unspent")
        _set_op(op.id, "done")
        _event("topup", sum(p.amount for _, p in made), op.mint, note="minted from a paid Lightning invoice")

    async def accept(self, token: str, kind: str = "receive", provider: str | None = None,
                     request_id: str | None = None) -> int:
        """Write a received token down (`incoming`) and nothing else: fast enough to do before a
        response goes on. `redeem()` makes it ours. Returns the operation."""
        parsed = parse_token(token)
        if parsed.mint not in self.mints:
            raise WalletError(f"the token is from mint {parsed.mint}, which [wallet] mints does not trust",
                              status=400, code="untrusted_mint")
        if parsed.unit != "sat":
            raise WalletError(f"the token is in {parsed.unit}; the wallet holds sats", status=400, code="invalid_token")

        def write() -> int:
            known = list(WalletProof.select().where(WalletProof.secret.in_([p.secret for p in parsed.proofs])))
            waiting = {row.operation for row in known if row.state == "incoming"}
            if len(known) == len(parsed.proofs) and len(waiting) == 1 and all(r.state == "incoming" for r in known):
                # Written down before and never swapped (the swap was cut off: a crash, a shutdown):
                # the node handed the same token again. Its operation is the one to finish.
                return waiting.pop()
            # Every proof an input of one of this wallet's swaps already (what a received token
            # becomes once redeemed): a token handed over again. The mint still decides; the
            # history then says so rather than calling it lost.
            again = len(known) == len(parsed.proofs) and all(r.state == "spent" and r.operation is None for r in known)
            op = WalletOperation.create(kind=kind, state="pending", mint=parsed.mint, amount_sats=parsed.amount_sats,
                                        provider=provider, request_id=request_id, created_at=now(), updated_at=now(),
                                        purpose=RECEIVED_BEFORE if again else "")
            by_secret = {row.secret: row for row in known}
            for proof in parsed.proofs:
                row = by_secret.get(proof.secret)
                if row is not None and row.state != "spent":
                    raise WalletError("the token was already received", status=400, code="token_already_received")
                if row is not None:
                    # One of our own tokens coming back (or one received before): the mint decides.
                    WalletProof.update(state="incoming", operation=op.id).where(WalletProof.id == row.id).execute()
                    continue
                WalletProof.create(mint=parsed.mint, keyset_id=proof.id, amount_sats=proof.amount, secret=proof.secret,
                                   signature=proof.C, state="incoming", operation=op.id, created_at=now())
            return op.id
        return await self._db(write)

    async def redeem(self, op_id: int) -> int:
        """Swap an accepted token into proofs only this wallet knows; returns the sats gained."""
        async with self._guard():
            return await self._redeem(op_id)

    async def _redeem(self, op_id: int) -> int:
        op, inputs = await self._db(lambda: self._op_proofs(op_id, ("incoming",)))
        if op.state == "swapping":
            # A swap of it was cut off in this run (a cancelled task): the mint may have done it.
            # Its outputs are written down; restoring them finishes it, or puts it back to pending.
            restored = await self._restore_outputs(op)
            op, inputs = await self._db(lambda: self._op_proofs(op_id, ("incoming",)))
            if op.state != "pending":
                return restored
        if not inputs or op.state != "pending":
            return 0
        def done(fee: int) -> None:
            _set_op(op.id, "done")
            _event(op.kind, op.amount_sats, op.mint, op.provider, op.request_id)
        try:
            fee = await self._swap(op, inputs, 0, done)
        except MintRefused as exc:
            if exc.mint_code not in SPENT_CODES:
                raise

            def dead() -> None:
                WalletProof.update(state="spent").where((WalletProof.operation == op.id)
                                                       & (WalletProof.state == "incoming")).execute()
                _set_op(op.id, "failed")
                if op.purpose == RECEIVED_BEFORE:
                    _event(RECEIVED_BEFORE, 0, op.mint, op.provider, op.request_id,
                           f"a token of {op.amount_sats} sats taken in before, handed over again: nothing lost")
                else:
                    _event("lost", 0, op.mint, op.provider, op.request_id,
                           f"a received token of {op.amount_sats} sats was already spent")
            await self._db(dead)
            raise WalletError("the token was already spent", status=400, code="token_already_spent") from None
        return op.amount_sats - fee

    async def receive(self, token: str, kind: str = "receive", provider: str | None = None,
                      request_id: str | None = None) -> int:
        return await self.redeem(await self.accept(token, kind, provider, request_id))

    @staticmethod
    def _op_proofs(op_id: int, states: tuple[str, ...]) -> tuple[WalletOperation, list[Proof]]:
        op = WalletOperation.get_by_id(op_id)
        rows = WalletProof.select().where((WalletProof.operation == op_id) & WalletProof.state.in_(states))
        return op, [_proof(r) for r in rows.order_by(WalletProof.id)]

    # -- money out -------------------------------------------------------------------------------

    async def send(self, amount: int, kind: str = "pay", provider: str | None = None,
                   request_id: str | None = None, purpose: str = "") -> OutgoingToken:
        """A token worth exactly `amount` sats, written down as pending (with provider, amount and
        request id) before it is returned. `settle()` or `reclaim()` ends it."""
        if amount <= 0:
            raise WalletError("the amount must be a positive number of sats", status=400, code="invalid_amount")
        async with self._guard():
            mint = self.primary

            def reserve() -> tuple[WalletOperation, list[Proof], bool]:
                available = list(WalletProof.select(WalletProof.id, WalletProof.amount_sats)
                                 .where((WalletProof.mint == mint) & (WalletProof.state == "unspent")).tuples())
                chosen, exact = choose_proofs(available, amount)
                if not chosen:
                    have = sum(a for _, a in available)
                    raise InsufficientFunds(
                        f"the wallet holds {have} sats at {mint}; this payment needs {amount} "
                        f"({amount - have} sats short)", details={"shortfall_sats": amount - have})
                op = WalletOperation.create(kind=kind, state="pending" if exact else "swapping", mint=mint,
                                            amount_sats=amount, provider=provider, request_id=request_id,
                                            purpose=purpose, created_at=now(), updated_at=now())
                taken = WalletProof.update(state="reserved", operation=op.id).where(
                    WalletProof.id.in_(chosen) & (WalletProof.state == "unspent")).execute()
                if taken != len(chosen):
                    # Another process (the CLI beside the proxy) took some of them first.
                    raise _Contended()
                chosen_rows = WalletProof.select().where(WalletProof.id.in_(chosen)).order_by(WalletProof.id)
                return op, [_proof(r) for r in chosen_rows], exact
            for attempt in range(5):
                try:
                    op, proofs, exact = await self._db(reserve)
                    break
                except _Contended:
                    if attempt == 4:
                        raise WalletError("the wallet is busy in another process; try again") from None
                    await asyncio.sleep(0.05)
            if not exact:
                try:
                    await self._swap(op, proofs, amount, lambda fee: _set_op(op.id, "pending"))
                except (MintRefused, InsufficientFunds):
                    await self._db(lambda: self._release(op.id))
                    raise
                _, proofs = await self._db(lambda: self._op_proofs(op.id, ("reserved",)))
        return OutgoingToken(op.id, serialize_token(mint, proofs), amount, mint)

    @staticmethod
    def _release(op_id: int) -> None:
        """Database thread: an operation that never got out gives its proofs back."""
        WalletProof.update(state="unspent", operation=None).where(
            (WalletProof.operation == op_id) & (WalletProof.state == "reserved")).execute()
        _set_op(op_id, "failed")

    async def token_of(self, op_id: int) -> str:
        """The token of an outgoing operation, rebuilt from its proofs (the same string as sent)."""
        op, proofs = await self._db(lambda: self._op_proofs(op_id, ("reserved", "spent")))
        return serialize_token(op.mint, proofs)

    async def settle(self, op_id: int, note: str = "", final: str = "done") -> None:
        """The receiver took the token: its proofs are spent, the operation `final` (done, or owed:
        an X-Cashu payment whose change is still to be collected)."""
        def write() -> None:
            op = WalletOperation.get_by_id(op_id)
            if op.state != "pending":
                return
            WalletProof.update(state="spent").where((WalletProof.operation == op_id)
                                                   & (WalletProof.state == "reserved")).execute()
            _set_op(op_id, final)
            _event(op.kind, -op.amount_sats, op.mint, op.provider, op.request_id, note)
        await self._db(write)

    async def reclaim(self, op_id: int) -> int:
        """The receiver did not take the token: swap its proofs back (the token string becomes
        worthless) and return the sats recovered; if it was taken after all, settle it."""
        async with self._guard():
            return await self._reclaim(op_id)

    async def _reclaim(self, op_id: int) -> int:
        op, proofs = await self._db(lambda: self._op_proofs(op_id, ("reserved",)))
        if not proofs:
            return 0
        states = await self.client(op.mint).check_state(proofs)
        # An X-Cashu payment the node took is owed its change until that is collected (or known lost).
        taken = "owed" if op.purpose == "xcashu" else "done"
        if all(s == "SPENT" for s in states):
            await self.settle(op_id, "redeemed by its receiver", taken)
            return 0
        unspent = [p for p, s in zip(proofs, states) if s != "SPENT"]
        recovered = 0

        def write(fee: int) -> None:
            nonlocal recovered
            recovered = sum(p.amount for p in unspent) - fee
            WalletProof.update(state="spent").where((WalletProof.operation == op_id)
                                                   & (WalletProof.state == "reserved")).execute()
            _set_op(op_id, "returned")
            if len(unspent) < len(proofs):
                _event(op.kind, recovered - op.amount_sats, op.mint, op.provider, op.request_id,
                       "part of a token was redeemed by its receiver")
        try:
            await self._swap(op, unspent, 0, write)
        except MintRefused as exc:
            if exc.mint_code not in SPENT_CODES:
                raise
            await self.settle(op_id, "redeemed by its receiver while being reclaimed", taken)
            return 0
        return recovered

    # -- keys at nodes made from wallet tokens ---------------------------------------------------

    async def remember_key(self, provider: str, url: str, api_key: str, funded_sats: int) -> None:
        def write() -> None:
            row = WalletKey.get_or_none(WalletKey.api_key == api_key)
            if row is None:
                WalletKey.create(provider=provider, url=url, api_key=api_key, funded_sats=funded_sats,
                                 created_at=now(), used_at=now())
            else:
                WalletKey.update(funded_sats=WalletKey.funded_sats + funded_sats,
                                 used_at=now()).where(WalletKey.id == row.id).execute()
        await self._db(write)

    async def keys(self, provider: str | None = None, states: tuple[str, ...] = KEYS_HOLDING) -> list[WalletKey]:
        """Wallet-funded keys in `states` (by default every key that may still hold sats), oldest first."""
        def read() -> list[WalletKey]:
            query = WalletKey.select().where(WalletKey.state.in_(states))
            if provider is not None:
                query = query.where(WalletKey.provider == provider)
            return list(query.order_by(WalletKey.id))
        return await self._db(read)

    async def mark_key(self, api_key: str, state: str) -> None:
        await self._db(lambda: WalletKey.update(state=state).where(WalletKey.api_key == api_key).execute())

    # -- after a crash ---------------------------------------------------------------------------

    async def reconcile(self, recover_change: Callable[[WalletOperation, str], Awaitable[int]] | None = None
                        ) -> ReconcileReport:
        """Finish or undo what a crash interrupted: swaps and mints in flight (their outputs come back
        through NUT-09 restore), tokens received but not swapped, tokens out whose fate is unknown
        (NUT-07: spent ones are settled, unspent ones swapped back)."""
        finished = reclaimed = settled = lost = 0
        async with self._guard():
            ops = await self._db(lambda: list(WalletOperation.select().where(
                WalletOperation.state.in_(("quoted", "minting", "swapping", "pending"))).order_by(WalletOperation.id)))
            for op in ops:
                if op.state in ("minting", "swapping"):
                    await self._restore_outputs(op)
                    finished += 1
                    op = await self._db(lambda: WalletOperation.get_by_id(op.id))
                if op.state == "quoted":
                    state = (await self.client(op.mint).quote_state(op.quote)).get("state")
                    if state == "PAID":
                        await self._mint_paid(op)
                        finished += 1
                elif op.state == "pending" and op.kind in ("receive", "change", "refund"):
                    try:
                        await self._redeem(op.id)
                        finished += 1
                    except WalletError:
                        log.warning("wallet: a received token of %d sats could not be redeemed", op.amount_sats)
                elif op.state == "pending":
                    # A key is named after the token that makes it: written down before the token left.
                    made = key_for_token(await self.token_of(op.id)) if op.purpose == "key" else None
                    got = await self._reclaim(op.id)
                    reclaimed += got
                    if got and made:
                        await self._db(lambda: WalletKey.update(state="void").where(
                            (WalletKey.api_key == made) & WalletKey.state.in_(KEYS_HOLDING)).execute())
                    if got == 0:
                        settled += op.amount_sats
        if recover_change is not None:
            # X-Cashu payments the node took, their change lost with the answer (now, or in an
            # earlier run that died while collecting it). Outside the lock: collecting the change
            # receives a token, which takes it.
            owed = await self._db(lambda: list(WalletOperation.select().where(WalletOperation.state == "owed")
                                               .order_by(WalletOperation.id)))
            for op in owed:
                if await self._db(lambda: _change_came(op)):
                    await self._db(lambda: _set_op(op.id, "done"))
                    continue
                token = await self.token_of(op.id)
                lost += not await self.collect_owed(op.id, lambda: recover_change(op, token))
        return ReconcileReport(finished, reclaimed, settled, lost)

    async def collect_owed(self, op_id: int, collect: Callable[[], Awaitable[int]]) -> int:
        """An X-Cashu payment the node took without its change reaching us: `collect()` asks the
        node for it (returns the sats received). The payment is done either way; a change that could
        not be had is said in the log and in the history, never silently."""
        try:
            got = await collect()
        except WalletError as exc:
            got = 0
            log.warning("wallet: the change of a request could not be collected: %s", exc.message)

        def write() -> WalletOperation:
            op = WalletOperation.get_by_id(op_id)
            if op.state == "owed":
                _set_op(op_id, "done")
                if not got:
                    _event("lost", 0, op.mint, op.provider, op.request_id,
                           f"no change to be had for a {op.amount_sats}-sat X-Cashu payment")
            return op
        op = await self._db(write)
        if not got:
            log.warning("wallet: the change of a %d-sat X-Cashu payment to %s (request %s) is lost: the node gave "
                        "none back", op.amount_sats, op.provider, op.request_id)
        return got

    async def _mint_paid(self, op: WalletOperation) -> int:
        """Mint a paid quote's sats; the outputs are written down before the mint signs them."""
        keyset = await self.keyset(op.mint)
        rows = self._new_outputs(op.id, keyset, amount_split(op.amount_sats), keep=True)

        def write_outputs() -> list[WalletOutput]:
            WalletOutput.insert_many(rows).execute()
            _set_op(op.id, "minting")
            return list(WalletOutput.select().where(WalletOutput.operation == op.id).order_by(WalletOutput.id))
        stored = await self._db(write_outputs)
        signatures = await self.client(op.mint).mint(op.quote, self._blinded(stored))
        made = await self._unblind(op.mint, stored, {r.blinded_message: s for r, s in zip(stored, signatures)})
        await self._db(lambda: self._finish_mint(op, made))
        return sum(p.amount for _, p in made)

    async def _restore_outputs(self, op: WalletOperation) -> int:
        """An operation cut between writing its outputs and storing their signatures; returns the
        sats restored (0 when the swap never happened and the operation is pending again)."""
        client = self.client(op.mint)
        stored, inputs = await self._db(lambda: (
            list(WalletOutput.select().where(WalletOutput.operation == op.id).order_by(WalletOutput.id)),
            self._op_proofs(op.id, ("reserved", "incoming"))[1]))
        if op.kind == "mint":
            signatures = await client.restore(self._blinded(stored)) if stored else {}
            if not signatures:
                quote = (await client.quote_state(op.quote)).get("state")
                await self._db(lambda: (WalletOutput.delete().where(WalletOutput.operation == op.id).execute(),
                                        _set_op(op.id, "quoted" if quote == "PAID" else "failed")))
                return 0
            made = await self._unblind(op.mint, stored, signatures)
            await self._db(lambda: self._finish_mint(op, made))
            return sum(p.amount for _, p in made)
        spent = inputs and all(s == "SPENT" for s in await client.check_state(inputs))
        signatures = await client.restore(self._blinded(stored)) if stored and spent else {}
        made = await self._unblind(op.mint, stored, signatures)
        # Whatever the operation meant to hand out never left: every restored proof is ours again.
        made = [(_KeepAll(row), proof) for row, proof in made]

        def write() -> None:
            if not spent:
                # The swap never happened: the operation is back where it was before it, with its
                # inputs still out (a token to reclaim, or one received to redeem).
                WalletOutput.delete().where(WalletOutput.operation == op.id).execute()
                WalletProof.update(state="reserved" if op.kind in ("pay", "send") else "incoming").where(
                    (WalletProof.operation == op.id) & WalletProof.state.in_(("reserved", "incoming"))).execute()
                _set_op(op.id, "pending")
                return
            self._store_made(op.id, op.mint, made, "unspent")
            restored, given = sum(p.amount for _, p in made), sum(p.amount for p in inputs)
            _set_op(op.id, "done" if op.kind not in ("pay", "send") else "returned")
            if op.kind not in ("pay", "send"):
                _event(op.kind, restored, op.mint, op.provider, op.request_id, "restored after its swap was cut off")
            elif restored < given:
                _event(op.kind, restored - given, op.mint, op.provider, op.request_id,
                       "redeemed by its receiver before a restart")
        await self._db(write)
        return sum(p.amount for _, p in made) if spent else 0


class _Contended(Exception):
    """Proofs chosen in a transaction were taken by another process before it wrote."""


class _KeepAll:
    """An output row seen as kept: used when a swap's outcome is restored after a crash."""

    def __init__(self, row: WalletOutput) -> None:
        self._row = row
        self.keep = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._row, name)
