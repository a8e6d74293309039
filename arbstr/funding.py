"""Money between the wallet and Routstr nodes: keys made from wallet tokens, top-ups, refunds, and
the change of an X-Cashu request collected again from the node.

Each move follows the wallet's rule: the token is written down as pending before it is sent,
and whatever the node hands back is written down before anything else happens to it.
routstr-core's balance API (v0.4.5): `/v1/balance/create`, `/topup`, `/refund`, `/info`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx

from arbstr.errors import WalletError
from arbstr.wallet import Wallet, key_for_token, normalize_mint_url

log = logging.getLogger("arbstr.funding")
TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class NodeBalance:
    balance_msats: int
    reserved_msats: int
    total_spent_msats: int
    total_requests: int


class NodeRefused(WalletError):
    """The node answered a balance call with an error: `status` and its words (never a token)."""

    def __init__(self, what: str, status: int, detail: str) -> None:
        super().__init__(f"the node refused {what}: HTTP {status} {detail[:200]}", code="node_refused")
        self.node_status = status


async def _call(method: str, url: str, what: str, **kwargs) -> httpx.Response:
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            response = await client.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        raise WalletError(f"the node at {url.split('/v1/')[0]} is unreachable ({type(exc).__name__}) for {what}",
                          status=503, code="node_unreachable") from None
    if response.status_code >= 400:
        raise NodeRefused(what, response.status_code, _error_words(response))
    return response


def _error_words(response: httpx.Response) -> str:
    """What a node's error says, with anything token-shaped cut out."""
    try:
        body = response.json()
    except ValueError:
        return ""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = body["error"].get("message")
    text = str(detail or "")
    return "" if "cashu" in text else text


async def balance_info(base_url: str, api_key: str) -> NodeBalance:
    response = await _call("GET", f"{base_url}/balance/info", "the balance query",
                           headers={"Authorization": f"Bearer {api_key}"})
    body = response.json()
    return NodeBalance(int(body.get("balance") or 0), int(body.get("reserved") or 0),
                       int(body.get("total_spent") or 0), int(body.get("total_requests") or 0))


async def accepted_mints(base_url: str) -> list[str]:
    """The mints a node takes ecash from (`/v1/info` `mints`), normalized; [] when it does not say."""
    response = await _call("GET", f"{base_url}/info", "its info")
    try:
        mints = response.json().get("mints")
    except ValueError:
        return []
    return [normalize_mint_url(m) for m in mints if isinstance(m, str)] if isinstance(mints, list) else []


async def fund_key(wallet: Wallet, provider: str, base_url: str, sats: int, api_key: str | None = None,
                   request_id: str | None = None) -> str:
    """Put `sats` of the wallet on a key at the node: a new key (made from the token) or a top-up of
    `api_key`. Returns the key. The key a new token makes is known before the token is sent (the
    node names it after the token's hash), so it is written down first: a crash cannot strand it."""
    out = await wallet.send(sats, "pay", provider, request_id, purpose="topup" if api_key else "key")
    key = api_key or key_for_token(out.token)
    await wallet.remember_key(provider, base_url, key, 0)
    try:
        if api_key is None:
            response = await _call("POST", f"{base_url}/balance/create", "a key from a token",
                                   json={"initial_balance_token": out.token})
            made = response.json().get("api_key")
            if made != key:
                log.warning("node %s named its key differently than routstr-core does", provider)
                await wallet.remember_key(provider, base_url, made, 0)
                key = made
        else:
            await _call("POST", f"{base_url}/balance/topup", "a top-up",
                        json={"cashu_token": out.token}, headers={"Authorization": f"Bearer {api_key}"})
    except WalletError:
        # Refused, unreachable, or no answer: the mint knows whether the node redeemed the token.
        # Not redeemed: it is swapped back. Redeemed (an answer lost on the way): the key holds it.
        if await wallet.reclaim(out.operation) > 0:
            if api_key is None:
                await wallet.mark_key(key, "void")  # never made
            raise
    await wallet.settle(out.operation, "on a key at the node")
    await wallet.remember_key(provider, base_url, key, sats)
    return key


async def refund_key(wallet: Wallet, provider: str, base_url: str, api_key: str) -> int:
    """Pay a key's balance at the node back into the wallet; returns the sats received (0 when the
    balance was below one sat).

    The key is written down as `refunding` before the node is asked, and is never used again: if
    the answer (a token) is lost, asking again gets the same token back, which routstr-core does
    only while the key's balance stays at zero. `finish_refunds` asks again after a crash."""
    await wallet.mark_key(api_key, "refunding")
    try:
        response = await _call("POST", f"{base_url}/balance/refund", "a refund",
                               headers={"Authorization": f"Bearer {api_key}"})
    except NodeRefused as exc:
        if exc.node_status == 400 and ("No balance" in exc.message or "too small" in exc.message):
            await wallet.mark_key(api_key, "refunded")
            return 0
        if exc.node_status == 401:
            # The node never made the key (its token did not get there) or has forgotten it: it
            # holds nothing under it any more. Asked once the start's reconcile settled the token.
            log.warning("wallet: %s does not know a wallet-funded key any more; it is set aside", provider)
            await wallet.mark_key(api_key, "void")
            return 0
        raise
    token = response.json().get("token") or response.headers.get("x-cashu")
    if not token:
        raise WalletError("the node's refund carried no token", code="node_refused")
    try:
        received = await wallet.receive(token, "refund", provider)
    except WalletError as exc:
        if exc.code not in ("token_already_spent", "token_already_received"):
            raise
        received = 0  # the node answered with a refund collected before (a crash between the two)
    await wallet.mark_key(api_key, "refunded")
    return received


async def finish_refunds(wallet: Wallet) -> int:
    """Refunds a crash interrupted (keys left `refunding`), asked of their nodes again; returns the
    sats received. A node that cannot answer now is asked again by the next refund or start."""
    total = 0
    for key in await wallet.keys(states=("refunding",)):
        try:
            total += await refund_key(wallet, key.provider, key.url, key.api_key)
        except WalletError as exc:
            log.warning("wallet: the interrupted refund of a key at %s is not finished: %s", key.provider,
                        exc.message)
    return total


CHANGE_PENDING_WAIT = 0.5
CHANGE_PENDING_TRIES = 20
"""How often, and how far apart, the change of a request still running at the node is asked for."""


async def collect_change(wallet: Wallet, provider: str, base_url: str, paid_token: str,
                         request_id: str | None = None) -> int:
    """The change of an X-Cashu request whose token the node took (the mint says so), asked of the
    node again with that token, for change lost in flight. Returns the sats received; 0 when the
    node has none. While the request still runs there the node answers 425, and 404 before it has
    written the payment down: both are asked again, for up to 10 s."""
    for attempt in range(CHANGE_PENDING_TRIES):
        try:
            response = await _call("POST", f"{base_url}/balance/refund", "the change of a request",
                                   headers={"X-Cashu": paid_token})
            break
        except NodeRefused as exc:
            last = attempt == CHANGE_PENDING_TRIES - 1
            if exc.node_status == 404 and last:
                return 0
            if exc.node_status not in (404, 425) or last:
                raise
        await asyncio.sleep(CHANGE_PENDING_WAIT)
    token = response.headers.get("x-cashu") or response.json().get("token")
    if not token:
        return 0
    try:
        return await wallet.receive(token, "change", provider, request_id)
    except WalletError as exc:
        if exc.code in ("token_already_spent", "token_already_received"):
            return 0  # collected before
        raise
