"""The endpoints arbstr answers itself, built from the engine's state and never forwarded.

Each takes the engine and the query parameters and returns `(status, payload)`; the addon turns
that into a response. Reads of the ledger run on its database thread, awaited, never blocking.
No secret is ever in a payload.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import peewee

from arbstr import __version__
from arbstr.config import mask_secret
from arbstr.engine import Engine
from arbstr.errors import ArbstrError
from arbstr.pricing import exact_sats
from arbstr.router import ProviderOffer
from arbstr.stats import (compute_stats, iso_time, list_requests, parse_bucket, parse_group, parse_page,
                          parse_window)
from arbstr.store import redact_url

if TYPE_CHECKING:
    from arbstr.funding import NodeBalance

Answer = tuple[int, dict[str, Any]]
Page = tuple[int, str, bytes]
"""Status, content type and content of an endpoint that does not answer JSON."""
Params = Mapping[str, str]


def _number(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


def _offer(offer: ProviderOffer) -> dict[str, Any]:
    """One provider's figures for one model: sats per 1k tokens, the fee it advertises, its limits."""
    return {"input_rate": float(offer.rates.input_per_1k), "output_rate": float(offer.rates.output_per_1k),
            "base_fee": float(offer.rates.per_request), "request_fee": float(offer.advertised_fee),
            "max_cost": _number(offer.max_cost),
            "context_length": offer.context_length, "source": offer.source}


async def list_models(engine: Engine, params: Params) -> Answer:
    """OpenAI's model list, each model with the providers (cheapest output first) and prices that serve it."""
    data = []
    for model in engine.catalogue.models():
        offers = sorted(engine.catalogue.by_model[model], key=lambda o: (o.rates.output_per_1k, o.rank))
        data.append({
            "id": model, "object": "model", "created": 0, "owned_by": "arbstr",
            "providers": [{"name": o.provider, **_offer(o)} for o in offers],
        })
    return 200, {"object": "list", "data": data}


async def health(engine: Engine, params: Params) -> Answer:
    """Each provider's state, last error and last success, and the ledger's; overall ok, degraded
    (a provider down or degraded, or the ledger failing to write) or down (503: no provider usable).
    The owner also sees the money: the wallet's sats per mint and what each provider's keys hold as
    its node last said (never asked here: /health stays as fast as the nodes are slow)."""
    status, payload = await _health(engine, with_errors=True)
    payload["balances"] = await money(engine)
    return status, payload


async def public_health(engine: Engine, params: Params) -> Answer:
    """`/health` for a client without the auth token: states only. Error texts come from providers
    and are for the owner, redacted as they are."""
    return await _health(engine, with_errors=False)


async def _health(engine: Engine, *, with_errors: bool) -> Answer:
    book = engine.health
    providers = []
    for p in engine.config.providers:
        known = book.providers[p.name]
        prices = engine.market.status(p)
        if not with_errors:  # texts from or about the provider's answers are for the owner too
            prices.update(error=None, skipped=[])
        providers.append({
            "name": p.name, "state": book.state(p.name), "models": prices.pop("models"), "prices": prices,
            "consecutive_failures": known.breaker.consecutive_failures,
            "last_error": known.last_error if with_errors else None, "last_error_at": iso_time(known.last_error_at),
            "last_success_at": iso_time(known.last_success_at),
            "charges": _charges(engine, p.name),
        })
    usable = [p for p in providers if p["state"] in ("up", "unknown", "degraded", "half_open")]
    ledger = engine.ledger.health() if engine.ledger else None
    status = "ok" if len(usable) == len(providers) and all(p["state"] != "degraded" for p in usable) \
        else "degraded" if usable else "down"
    if status == "ok" and ledger is not None and ledger.state != "ok":
        status = "degraded"
    payload = {"status": status, "version": __version__, "price_reads": engine.market.refreshes, "providers": providers}
    if ledger is not None:
        payload["ledger"] = ledger.to_dict()
    if engine.budgets.budgets and with_errors:  # what was spent is the owner's business
        payload["budgets"] = [u.to_payload() for u in await engine.budgets.standings()]
    return (503 if status == "down" else 200), payload


async def budgets(engine: Engine, params: Params) -> Answer:
    """Each budget's limit, spent, reserved, remaining, reset time and the alert thresholds reached."""
    return 200, {"object": "list", "data": [u.to_payload() for u in await engine.budgets.standings()]}


def _charges(engine: Engine, provider: str) -> dict[str, Any]:
    """Its reported charges checked against its advertised prices since start, and what that earned it."""
    totals = engine.track.charges(provider)
    return {"checked": totals.checked, "overcharged": totals.overcharged,
            "overcharged_msats": totals.overcharged_msats, "standing": engine.track.standing(provider)}


async def list_providers(engine: Engine, params: Params) -> Answer:
    """Each provider with its offers per model as routed now, and where their prices come from."""
    catalogue = engine.catalogue
    offers: dict[str, list[ProviderOffer]] = {}
    for model in catalogue.models():
        for offer in catalogue.by_model[model]:
            offers.setdefault(offer.provider, []).append(offer)
    return 200, {"providers": [
        {"name": p.name, "url": p.url, "pricing": p.pricing, "api_key": mask_secret(p.api_key),
         "input_rate": _number(p.input_rate), "output_rate": _number(p.output_rate), "base_fee": float(p.base_fee),
         "models": {o.model: _offer(o) for o in offers.get(p.name, [])}}
        for p in engine.config.providers
    ]}


async def stats(engine: Engine, params: Params) -> Answer:
    window = parse_window(params, time.time())
    group, bucket = parse_group(params), parse_bucket(params)
    return 200, await _read(engine, lambda: compute_stats(window, group, bucket))


async def requests(engine: Engine, params: Params) -> Answer:
    window = parse_window(params, time.time())
    limit, offset = parse_page(params)
    return 200, await _read(engine, lambda: list_requests(window, limit, offset))


async def wallet(engine: Engine, params: Params) -> Answer:
    """The wallet's sats per mint and the wallet-funded keys at nodes: amounts only, never a token or key."""
    if engine.wallet is None:
        raise ArbstrError("No wallet is configured: add a [wallet] section naming your mint.", code="no_wallet",
                          status=404, type="invalid_request_error")
    keys = await engine.wallet.keys()
    return 200, {**await wallet_sats(engine), "keys": [{"provider": k.provider, "funded_sats": k.funded_sats}
                                                       for k in keys]}


async def wallet_sats(engine: Engine) -> dict[str, Any] | None:
    """The wallet's sats, in all and per mint (None without a wallet)."""
    if engine.wallet is None:
        return None
    mints = await engine.wallet.balance()
    return {
        "spendable_sats": sum(b["unspent"] for b in mints.values()),
        "mints": [{"url": url, "spendable_sats": b["unspent"], "in_tokens_out_sats": b["reserved"],
                   "incoming_sats": b["incoming"]} for url, b in mints.items()],
    }


async def money(engine: Engine) -> dict[str, Any]:
    """The wallet's sats per mint, and what each provider's keys hold as their nodes last said
    (/health and /metrics never ask a node: /v1/balances does, and with a wallet arbstr does every
    BALANCE_MAX_AGE, `refresh_balances`); kept on the engine for /metrics' collector. It answers
    while the database does not: the wallet's part then says why it is missing."""
    try:
        wallet = await wallet_sats(engine)
    except (ArbstrError, peewee.PeeweeException) as exc:
        wallet = {"error": redact_url(getattr(exc, "message", None) or str(exc)).strip()}
    keys = await _keys(engine)
    engine.money = {"wallet": wallet, "providers": key_balances(engine, keys)}
    return engine.money


BALANCE_MAX_AGE = 30.0
"""Seconds a node's answer about a key's balance is shown before the node is asked again."""
BALANCE_TIMEOUT = 5.0


async def balances(engine: Engine, params: Params) -> Answer:
    """What each provider's keys hold, as its node reports it (Routstr's GET /v1/balance/info), and
    the wallet's spendable sats. Each node is asked at most every BALANCE_MAX_AGE seconds, off the
    request path; amounts only, never a key."""
    keys = await _keys(engine)
    await refresh_key_balances(engine, keys)
    return 200, {"providers": key_balances(engine, keys), "wallet": await wallet_sats(engine)}


Key = tuple[str, str, str]
"""A key at a node: (provider, base URL, key)."""


async def _keys(engine: Engine) -> list[Key]:
    """Every key arbstr pays with: each provider's configured one, and the wallet-funded ones."""
    keys = [(e.name, e.base_url, e.api_key) for e in engine.endpoints.values() if e.api_key]
    if engine.wallet is not None:
        try:
            keys += [(k.provider, k.url, k.api_key) for k in await engine.wallet.keys()]
        except peewee.PeeweeException:
            pass  # the configured keys are still worth showing while the database fails
    return keys


async def refresh_balances(engine: Engine) -> None:
    """Ask every key's node what it holds, where the last answer is stale."""
    await refresh_key_balances(engine, await _keys(engine))


async def refresh_key_balances(engine: Engine, keys: list[Key]) -> None:
    """Ask the nodes of `keys` whose last answer is older than BALANCE_MAX_AGE what they hold."""
    from arbstr.funding import balance_info  # the wallet's node client; only balances need it

    now = time.monotonic()
    known = engine.node_balances
    stale = [key for _, _, key in keys if key not in known or now - known[key][0] > BALANCE_MAX_AGE]
    urls = {key: url for _, url, key in keys}

    async def ask(key: str) -> tuple[float, NodeBalance | str]:
        try:
            return now, await asyncio.wait_for(balance_info(urls[key], key), BALANCE_TIMEOUT)
        except TimeoutError:
            return now, f"the node did not answer within {BALANCE_TIMEOUT:g} s"
        except ArbstrError as exc:
            return now, exc.message
    for key, answer in zip(stale, await asyncio.gather(*(ask(key) for key in stale))):
        known[key] = answer


def key_balances(engine: Engine, keys: list[Key]) -> list[dict[str, Any]]:
    """Per provider, what its keys hold as their nodes last said (keys never asked yet are left out):
    amounts only, never a key."""
    providers: dict[str, dict[str, Any]] = {}
    for name, _, key in keys:
        if key not in engine.node_balances:
            continue
        checked, answer = engine.node_balances[key]
        entry = providers.setdefault(name, {"name": name, "balance_sats": None, "reserved_sats": None,
                                            "keys": 0, "errors": []})
        entry["keys"] += 1
        if isinstance(answer, str):
            entry["errors"].append(answer)
            continue
        for field, msats in (("balance_sats", answer.balance_msats), ("reserved_sats", answer.reserved_msats)):
            entry[field] = exact_sats(Decimal(entry[field] or 0) + Decimal(msats) / 1000)
    return list(providers.values())


async def _read(engine: Engine, query: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if engine.ledger is None:
        raise ArbstrError("No database is configured.", code="no_database", status=503)
    try:
        return await asyncio.wrap_future(engine.ledger.submit(query))
    except peewee.PeeweeException as exc:
        raise ArbstrError(f"The ledger database cannot be read right now: {redact_url(str(exc)).strip()}",
                          code="database_unavailable", status=503) from None


async def metrics(engine: Engine, params: Params) -> Page:
    """Prometheus' text format: what was routed, spent and saved, each provider's state, and the money."""
    await money(engine)  # read now, reported by the metrics' state collector
    content, content_type = engine.metrics.exposition()
    return 200, content_type, content


ENDPOINTS: dict[str, Callable[[Engine, Params], Awaitable[Answer]]] = {
    "/v1/models": list_models,
    "/models": list_models,
    "/health": health,
    "/providers": list_providers,
    "/v1/stats": stats,
    "/v1/requests": requests,
    "/v1/wallet": wallet,
    "/v1/balances": balances,
    "/v1/budgets": budgets,
}
"""GET endpoints by path."""

PAGES: dict[str, Callable[[Engine, Params], Awaitable[Page]]] = {
    "/metrics": metrics,
}
"""GET endpoints that answer something other than JSON, by path."""

PUBLIC_ENDPOINTS: dict[str, Callable[[Engine, Params], Awaitable[Answer]]] = {"/health": public_health}
"""What a client without the auth token may still ask, by path (it sees less)."""
