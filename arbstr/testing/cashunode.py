"""A fake Routstr node that is paid in real ecash: it redeems every token at a real mint.

It is `arbstr.mock.MockProvider` (prices, reservations, streams, fault injection) plus the money
side of routstr-core v0.4.5's API, mirrored from its routes (not its code) and from what two real
nodes did (ROUTSTR.md, "Measured on two real nodes"):
- keys from tokens: `GET|POST /v1/balance/create` (`initial_balance_token`) redeems the token and
  answers `{"api_key": "sk-" + sha256(token), "balance": msats}`; the same token maps to the same key;
- `POST /v1/balance/topup` (`cashu_token` in the query or JSON) adds a token to a key: `{"msats": N}`;
- `POST /v1/balance/refund` with the key pays the balance out as a token of `balance // 1000`
  sats (the msats below a sat stay at the node, as on routstr-core) and zeroes it; with `X-Cashu:
  <token a request was paid with>` it answers that request's change again;
- pay per request (`X-Cashu` instead of Authorization): a token below the request's reservation
  gets 402 `{"detail": {"reason": "Insufficient balance", "amount_required_msat": N, ...}}` and is
  not taken; a spent one gets 400 `cashu_token_already_spent`; otherwise the change (the token minus
  the cost rounded up to whole sats) comes back as a new token in the `X-Cashu` response header,
  and a failed upstream gives the whole amount back the same way;
- the quirks: X-Cashu streams are buffered and sent at the end; the change of a request whose
  client left is kept (only the refund endpoint gives it out); `xcashu_cut_body` sends a
  non-streamed answer's headers, change included, then a body cut short;
- while an X-Cashu request runs (its token taken, `latency` the upstream's time) the refund endpoint
  answers 425 for it, as routstr-core does until the change is written.
Every sat the node holds is accounted: `charged_msats()`, `balances_msats()`, `refund_remainder_msats`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import tempfile
import uuid
from collections.abc import Callable
from urllib.parse import parse_qs

from arbstr.errors import WalletError
from arbstr.mock import (MockModel, MockProvider, ReceivedRequest, _Account, _ApiError, _compact, _Completion,
                         _Connection)
from arbstr.store import Ledger
from arbstr.wallet import Wallet, key_for_token, parse_token, serialize_token


def _token_id(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


def as_node_token(token: str) -> str:
    """A token as routstr-core's wallet writes it: each keyset named by its short id (the first 8
    bytes of a version-2 id, NUT-02), which only resolves against the mint's keyset list."""
    parsed = parse_token(token)
    return serialize_token(parsed.mint, [p.copy(update={"id": p.id[:16]}) for p in parsed.proofs])


class _Recorder:
    """Stands in for the connection while a buffered X-Cashu stream is produced, to send it later."""

    def __init__(self) -> None:
        self.status = 200
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.was_cut = False

    async def send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status, self.headers, self.chunks = status, headers, [body]

    async def start_stream(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.status, self.headers = status, headers

    async def send_chunk(self, data: bytes) -> None:
        self.chunks.append(data)

    async def end_stream(self) -> None:
        pass

    def cut(self) -> None:
        self.was_cut = True


class CashuNode(MockProvider):
    """A Routstr node that trusts `mint_url` and keeps its takings in a wallet of its own."""

    def __init__(self, name: str, models: list[MockModel] | None = None, *, mint_url: str,
                 advertised_mints: list[str] | None = None, **kwargs) -> None:
        super().__init__(name, models, api_keys=set(), **kwargs)
        self.mint_url = mint_url
        self.advertised_mints = advertised_mints or [mint_url]
        """What `/v1/info` says the node takes (a node of another mint's users, when not the real one)."""
        self.xcashu_cut_body = False
        self.xcashu_earned_msats = 0
        """What X-Cashu requests paid the node (their cost rounded up to whole sats)."""
        self.refund_remainder_msats = 0
        """Balances below a whole sat left at the node by refunds."""
        self.before_answer: Callable[[str], None] | None = None
        """Called once money moved at the node and before its answer goes out, with where: `create`
        (a token became a key), `topup`, `refund` (a key's balance paid out as a token), `xcashu_taken`
        (a request's token redeemed), `xcashu_change` (its change made). A test kills the client there
        so that the answer, and whatever token it carries, is lost on the way."""
        self._tmp = tempfile.TemporaryDirectory(prefix=f"arbstr-node-{name}-")
        self._ledger = Ledger(f"{self._tmp.name}/node.db", flush_interval=0)
        self.wallet = Wallet(self._ledger, [mint_url])
        self._change: dict[str, tuple[str, int]] = {}
        """Paid token id -> (change token, sats): what the refund endpoint answers for X-Cashu."""
        self._answering: set[str] = set()
        """Paid token ids of X-Cashu requests still running: their refund is not known yet (425)."""
        self._refunds: dict[str, tuple[str, int]] = {}
        """Key -> its last refund (token, sats): asked again while the key stays empty, it is answered
        again (routstr-core's refund cache); a key topped up since has lost it."""
        self._routes.update({
            "/v1/balance/create": {"GET": self._create, "POST": self._create},
            "/v1/balance/topup": {"POST": self._topup},
            "/v1/balance/refund": {"POST": self._refund},
        })

    def stop(self) -> None:
        super().stop()
        self._ledger.close()
        self._tmp.cleanup()

    # -- what tests check ------------------------------------------------------------------------

    def balances_msats(self) -> int:
        """What the node owes across every key it made."""
        with self._lock:
            return sum(a.balance for a in self._accounts.values())

    def charged_msats(self) -> int:
        """What the node kept for answers: X-Cashu payments plus what keys spent."""
        with self._lock:
            return self.xcashu_earned_msats + sum(a.total_spent for a in self._accounts.values())

    def balance_of(self, api_key: str) -> int:
        with self._lock:
            return self._accounts[api_key].balance if api_key in self._accounts else 0

    def _moved(self, where: str) -> None:
        if self.before_answer is not None:
            self.before_answer(where)

    # -- HTTP ------------------------------------------------------------------------------------

    async def _info(self, request: ReceivedRequest, connection: _Connection) -> None:
        body = _compact({"name": self.name, "description": f"Fake Routstr node {self.name}", "version": "0.4.5",
                         "npub": "", "mints": self.advertised_mints, "http_url": self._origin, "onion_url": None})
        await connection.send_json(200, body, str(uuid.uuid4()))

    @staticmethod
    def _params(request: ReceivedRequest) -> dict[str, str]:
        params = {k: v[0] for k, v in parse_qs(request.path.partition("?")[2]).items()}
        if request.body:
            try:
                body = json.loads(request.body)
            except ValueError:
                body = None
            if isinstance(body, dict):
                params.update({k: v for k, v in body.items() if isinstance(v, str)})
        return params

    async def _error(self, connection: _Connection, status: int, detail: object,
                     headers: list[tuple[str, str]] | None = None) -> None:
        request_id = str(uuid.uuid4())
        await connection.send_json(status, _compact({"detail": detail}), request_id, headers or [])

    async def _redeem(self, token: str) -> int | None:
        """The token's sats, now the node's; None when the mint refused it (spent, foreign, garbage)."""
        try:
            return await self.wallet.receive(token)
        except WalletError:
            return None

    async def _create(self, request: ReceivedRequest, connection: _Connection) -> None:
        token = self._params(request).get("initial_balance_token", "")
        key = key_for_token(token.strip())
        with self._lock:
            known = key in self.api_keys
        if not known:
            sats = await self._redeem(token)
            if sats is None:
                await self._spent(connection)
                return
            with self._lock:
                self.api_keys.add(key)
                self._accounts[key] = _Account(balance=sats * 1000)
            self._moved("create")
        await connection.send_json(200, _compact({"api_key": key, "balance": self.balance_of(key)}),
                                   str(uuid.uuid4()))

    async def _spent(self, connection: _Connection) -> None:
        request_id = str(uuid.uuid4())
        error = _ApiError(400, "Cashu token already spent", "invalid_request_error", "cashu_token_already_spent")
        await connection.send_json(400, error.body(request_id), request_id)

    def _key(self, request: ReceivedRequest) -> str | None:
        try:
            key = self._bearer_key(request)
        except _ApiError:
            return None
        return key if key in self.api_keys else None

    async def _topup(self, request: ReceivedRequest, connection: _Connection) -> None:
        key = self._key(request)
        if key is None:
            await self._error(connection, 401, "Invalid authorization. Use 'Bearer <cashu-token>' or 'Bearer <api-key>'")
            return
        sats = await self._redeem(self._params(request).get("cashu_token", ""))
        if sats is None:
            await self._spent(connection)
            return
        with self._lock:
            self._accounts[key].balance += sats * 1000
        self._moved("topup")
        await connection.send_json(200, _compact({"msats": sats * 1000}), str(uuid.uuid4()))

    async def _refund(self, request: ReceivedRequest, connection: _Connection) -> None:
        paid = request.header("x-cashu")
        if paid:
            change = self._change.get(_token_id(paid))
            if change is None and _token_id(paid) in self._answering:
                # routstr-core: the payment is in, its refund not written yet; retry shortly.
                await self._error(connection, 425, "Refund is pending; retry shortly.", [("Retry-After", "2")])
                return
            if change is None:
                await self._error(connection, 404, "Refund not found")
                return
            token, sats = change
            await connection.send_json(200, _compact({"token": token, "sats": str(sats)}), str(uuid.uuid4()),
                                       [("X-Cashu", token)])
            return
        key = self._key(request)
        if key is None:
            await self._error(connection, 401, {"error": {"message": "Key not found.", "type": "invalid_request_error",
                                                          "code": "key_not_found"}})
            return
        with self._lock:
            account = self._accounts[key]
            given = self._refunds.get(key)
            if account.balance == 0 and given is not None:
                # routstr-core answers a key already refunded with its last refund token again.
                problem, repeat = None, given
            elif account.reserved > 0:
                problem, repeat = "Cannot refund key. There are ongoing requests for this api key.", None
            elif account.balance < 1000:
                problem, repeat = ("Balance too small to refund" if account.balance > 0
                                   else "No balance to refund"), None
            else:
                problem, repeat = None, None
                msats, account.balance = account.balance, 0
        if problem:
            await self._error(connection, 400, problem)
            return
        if repeat is None:
            sats = msats // 1000
            out = await self.wallet.send(sats, kind="send")
            await self.wallet.settle(out.operation)
            self.refund_remainder_msats += msats - sats * 1000
            repeat = self._refunds[key] = (as_node_token(out.token), sats)
            self._moved("refund")
        token, sats = repeat
        await connection.send_json(200, _compact({"token": token, "sats": str(sats)}), str(uuid.uuid4()))

    # -- pay per request -------------------------------------------------------------------------

    async def _chat_completions(self, request: ReceivedRequest, connection: _Connection) -> None:
        paid = request.header("x-cashu")
        if not paid or request.header("authorization") is not None:
            await super()._chat_completions(request, connection)
            return
        try:
            completion = self._plan_completion(request)
        except _ApiError as error:
            request_id = str(uuid.uuid4())
            await connection.send_json(error.status, error.body(request_id), request_id)
            return
        try:
            offered = parse_token(paid).amount_sats
        except WalletError:
            offered = 0
        if offered * 1000 < completion.reserve_msats:
            # Checked before redeeming: the token is not taken.
            await self._error(connection, 402, {"reason": "Insufficient balance",
                                                "amount_required_msat": completion.reserve_msats,
                                                "model": completion.model.id, "type": "minimum_balance_required"})
            return
        sats = await self._redeem(paid)
        if sats is None:
            await self._spent(connection)
            return
        self._answering.add(_token_id(paid))
        try:
            await self._answer_paid(connection, completion, paid, sats)
        finally:
            self._answering.discard(_token_id(paid))

    async def _answer_paid(self, connection: _Connection, completion: _Completion, paid: str, sats: int) -> None:
        """An X-Cashu request whose token is the node's now: the answer, and the change with it."""
        self._moved("xcashu_taken")
        if self.latency > 0:
            await asyncio.sleep(self.latency)  # the upstream at work: the token is the node's already
        request_id = str(uuid.uuid4())
        if (status := self.fail_status) is not None:
            change = await self._give_change(paid, sats)
            body = _compact({"error": {"message": "Error forwarding request to upstream", "type": "upstream_error",
                                       "code": status}})
            await connection.send(status, [("content-length", str(len(body))), ("content-type", "application/json"),
                                           ("X-Cashu", change)], body)
            return
        account = _Account(balance=sats * 1000)
        recorder = _Recorder()
        if completion.stream:
            finished = await self._stream_completion(completion, account, recorder, request_id, [])
        else:
            remaining = self._settle(account, completion.reserve_msats, completion.charge.total_msats)
            finished = True
            await self._send_completion(completion, remaining, recorder, request_id, [])
        # A cut upstream leaves the node without usage: it keeps the whole token (routstr-core does).
        kept_sats = math.ceil(completion.charge.total_msats / 1000) if finished else sats
        self.xcashu_earned_msats += kept_sats * 1000
        headers = list(recorder.headers)
        if sats - kept_sats > 0:
            headers.append(("X-Cashu", await self._give_change(paid, sats - kept_sats)))
            self._moved("xcashu_change")
        await self._replay(recorder, headers, connection, completion.stream)

    async def _give_change(self, paid: str, sats: int) -> str:
        out = await self.wallet.send(sats, kind="send")
        await self.wallet.settle(out.operation)
        token = as_node_token(out.token)
        # Kept before it is sent: a client that leaves can still collect it from /v1/balance/refund.
        self._change[_token_id(paid)] = (token, sats)
        return token

    async def _replay(self, recorder: _Recorder, headers: list[tuple[str, str]], connection: _Connection,
                      stream: bool) -> None:
        """Send what was produced, all at once now that the change is known."""
        if not stream:
            body = b"".join(recorder.chunks)
            if self.xcashu_cut_body:
                # Headers (change included) promise the whole body; a part arrives, then the connection ends.
                connection.writer.write(connection._head(recorder.status, headers) + body[:len(body) // 3])
                await connection.writer.drain()
                connection.cut()
                return
            await connection.send(recorder.status, headers, body)
            return
        await connection.start_stream(recorder.status, headers)
        for chunk in recorder.chunks:
            await connection.send_chunk(chunk)
        if recorder.was_cut:
            connection.cut()
        else:
            await connection.end_stream()
