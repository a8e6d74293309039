"""The live Routstr market: each provider's offers per model, read from its `/v1/models`.

A Routstr node prices every model itself (`sats_pricing`, sats per token) and moves those prices
with the bitcoin rate, so a hand-written price list is wrong within hours. The `Market` reads every
provider at start and every `[routing] price_refresh` seconds, off the request path, and swaps in a
new immutable `Catalogue`: the router only ever sees offers.

What an offer's estimate charges is what routstr-core (v0.4.5, measured) bills:
`ceil(prompt × sats_pricing.prompt × 1000 + completion × sats_pricing.completion × 1000)` msats.
The `request` fee a node advertises was never charged, so it is shown (`advertised_fee`) but not
added to estimates; a `base_fee` written in the config is, since the user says the provider bills it.

The pure part (`parse_model_list`, `adopt_listing`, `provider_offers`) is tested without a network.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any

from arbstr.config import Config, ProviderConfig
from arbstr.httpclient import BodyTooLarge, HttpClient, HttpError
from arbstr.logs import event
from arbstr.pricing import THOUSAND, Rates, format_sats
from arbstr.router import Catalogue, ProviderOffer, config_offer

MAX_LISTING_BYTES = 8 * 1024 * 1024
"""A model list larger than this is not read (a real node's is a few kilobytes a model)."""


class MarketError(Exception):
    """A provider's offers could not be read; the message says why, for /health and the log."""


@dataclass(frozen=True, slots=True)
class LiveModel:
    """One entry of a provider's `/v1/models`, in arbstr's units."""

    model: str
    rates: Rates
    """Per 1k tokens; `per_request` is 0 because nodes do not bill the advertised fee."""
    advertised_fee: Decimal
    max_cost: Decimal | None
    context_length: int | None
    enabled: bool


@dataclass(frozen=True, slots=True)
class PriceJump:
    """A live price that moved by more than `[routing] max_price_jump` since the one in use."""

    model: str
    old: Rates
    new: Rates
    factor: float

    def describe(self) -> str:
        return (f"{self.model}: price moved {self.factor:.1f}x (in/out per 1k "
                f"{format_sats(self.old.input_per_1k)}/{format_sats(self.old.output_per_1k)} -> "
                f"{format_sats(self.new.input_per_1k)}/{format_sats(self.new.output_per_1k)} sats)")


@dataclass(frozen=True, slots=True)
class ProviderPrices:
    """What the market knows of one provider's prices."""

    listing: Mapping[str, LiveModel] | None = None
    """The live offers in use (a held model keeps its previous price here); None until first read."""
    read_at: float | None = None
    """Unix time of the last successful read."""
    error: str | None = None
    """Why the last read failed; set means the prices are stale."""
    held: Mapping[str, PriceJump] = field(default_factory=dict)
    dropped: frozenset[str] = frozenset()
    """Models the provider said it does not serve since the last read."""
    skipped: tuple[str, ...] = ()
    """Entries of the last listing that could not be used, with why."""
    unpriced: frozenset[str] = frozenset()
    """Models the last listing offers without a usable price: routed at configured prices, if any."""

    @property
    def stale(self) -> bool:
        return self.error is not None


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, str)):
        raise ValueError(f"{where} is not a number")
    try:
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{where} is not a number") from None
    if not number.is_finite() or number < 0:
        raise ValueError(f"{where} is not a price")
    return number


def _live_model(entry: Any) -> LiveModel:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"].strip():
        raise ValueError("an entry without an id")
    model = entry["id"]
    sats = entry.get("sats_pricing")
    if not isinstance(sats, dict):
        raise ValueError(f"{model}: no sats_pricing")
    prompt = _decimal(sats.get("prompt"), f"{model}: sats_pricing.prompt")
    completion = _decimal(sats.get("completion"), f"{model}: sats_pricing.completion")
    fee = _decimal(sats.get("request", 0), f"{model}: sats_pricing.request")
    max_cost = sats.get("max_cost")
    context = entry.get("context_length")
    return LiveModel(
        model, Rates(prompt * THOUSAND, completion * THOUSAND), fee,
        None if max_cost is None else _decimal(max_cost, f"{model}: sats_pricing.max_cost"),
        context if isinstance(context, int) and not isinstance(context, bool) and context > 0 else None,
        entry.get("enabled", True) is not False)


@dataclass(frozen=True, slots=True)
class ModelList:
    """What a node's `/v1/models` says."""

    models: dict[str, LiveModel]
    skipped: list[str]
    """Each entry that could not be used, with why."""
    unpriced: frozenset[str]
    """Enabled models listed without a usable price."""


def parse_model_list(payload: Any) -> ModelList:
    """A node's `/v1/models` (decoded JSON). Raises MarketError when it is not a model list at all."""
    entries = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(entries, list):
        raise MarketError('its /v1/models has no "data" list')
    models, skipped, unpriced = {}, [], set()
    for entry in entries:
        try:
            live = _live_model(entry)
        except ValueError as exc:
            skipped.append(str(exc))
            if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry.get("enabled", True) is not False:
                unpriced.add(entry["id"])
            continue
        models[live.model] = live
    return ModelList(models, skipped, frozenset(unpriced - models.keys()))


def price_factor(old: Rates, new: Rates) -> float:
    """How far a price moved, as a factor >= 1 (the larger of the input and output moves, either way)."""
    factor = 1.0
    for before, after in ((old.input_per_1k, new.input_per_1k), (old.output_per_1k, new.output_per_1k)):
        if before == after:
            continue
        if before == 0 or after == 0:
            return float("inf")
        factor = max(factor, float(after / before), float(before / after))
    return factor


def adopt_listing(previous: ProviderPrices, read: ModelList, now: float, max_jump: float) -> ProviderPrices:
    """The provider's prices after a successful read. A model whose price moved more than `max_jump`
    since the price in use keeps the old one and is held (not routed) until a read brings it back
    within bounds; a restart or config reload adopts whatever the node says."""
    adopted, held = dict(read.models), {}
    if previous.listing is not None:
        for model, live in read.models.items():
            before = previous.listing.get(model)
            if before is None:
                continue
            factor = price_factor(before.rates, live.rates)
            if factor > max_jump:
                held[model] = PriceJump(model, before.rates, live.rates, factor)
                adopted[model] = before
    return ProviderPrices(adopted, now, None, held, frozenset(), tuple(read.skipped), read.unpriced)


def provider_offers(provider: ProviderConfig, rank: int, prices: ProviderPrices) -> list[ProviderOffer]:
    """What one provider offers now.

    `pricing = "config"`: the configured models at configured prices, less those a readable listing
    leaves out or disables. `pricing = "live"`: the listing's enabled models at its prices, less held
    ones (a listed model without a usable price at its configured price, when it has one); while the
    provider cannot be read, the configured prices (`fallback`), else the last
    listing read (`stale`), else nothing. A model the provider said it does not serve is left out
    until the next read either way.
    """
    listing = prices.listing
    readable = listing is not None and not prices.stale
    if provider.pricing == "config":
        offers = [config_offer(provider, model, rank) for model in provider.priced_models
                  if not readable or (model in listing and listing[model].enabled)]
        if readable:
            offers = [_with_limits(offer, listing[offer.model], provider) for offer in offers]
    elif readable or (listing is not None and not provider.priced_models):
        source = "live" if readable else "stale"
        offers = [_live_offer(provider, rank, live, source) for live in listing.values()
                  if live.enabled and live.model not in prices.held]
        offers += [config_offer(provider, model, rank, "fallback") for model in provider.priced_models
                   if model in prices.unpriced]
    else:
        offers = [config_offer(provider, model, rank, "fallback") for model in provider.priced_models]
    offers = [offer for offer in offers if offer.model not in prices.dropped]
    return [paid_per_request(offer) for offer in offers] if provider.payment == "xcashu" else offers


XCASHU_ROUNDING = Decimal("0.5")
"""Sats an answer paid by X-Cashu costs above its bill, on average: the change comes back in whole
sats, so the node keeps the bill's rounding up to a whole sat (half a sat when bills' fractions
of a sat spread evenly; measured on routstr-core v0.4.5: 12 answers of about 0.3 sats cost 15)."""


def paid_per_request(offer: ProviderOffer) -> ProviderOffer:
    """An offer as routing, estimates and budgets see it when each answer is paid by X-Cashu: the
    rounding the node keeps counts as a per-request fee. The provider's advertised fee, which its
    charges are checked against, is left as it is."""
    rates = offer.rates
    return replace(offer, rates=Rates(rates.input_per_1k, rates.output_per_1k, rates.per_request + XCASHU_ROUNDING),
                   payment_overhead=offer.payment_overhead + XCASHU_ROUNDING)


def _live_offer(provider: ProviderConfig, rank: int, live: LiveModel, source: str) -> ProviderOffer:
    offer = ProviderOffer(provider.name, live.model, live.rates, rank, live.advertised_fee, live.max_cost,
                          live.context_length, source)
    return _with_limits(offer, live, provider)


def _with_limits(offer: ProviderOffer, live: LiveModel, provider: ProviderConfig) -> ProviderOffer:
    """The node's own max_cost and context length, unless the config sets them for this model."""
    own = provider.models.get(offer.model)
    return replace(offer,
                   max_cost=own.max_cost if own and own.max_cost is not None else live.max_cost,
                   context_length=own.context_length if own and own.context_length else live.context_length)


def build_catalogue(providers: Iterable[ProviderConfig], prices: Mapping[str, ProviderPrices]) -> Catalogue:
    return Catalogue(offer for rank, provider in enumerate(providers)
                     for offer in provider_offers(provider, rank, prices[provider.name]))


async def fetch_json(client: HttpClient, url: str, timeout: float, api_key: str | None = None) -> Any:
    """GET a JSON document (at most MAX_LISTING_BYTES) within `timeout` seconds; MarketError says why not.
    The provider's own key goes along when there is one, as with every request arbstr sends it."""
    headers = [(b"accept", b"application/json"), (b"accept-encoding", b"identity")]
    if api_key:
        headers.append((b"authorization", b"Bearer " + api_key.encode("latin-1", "replace")))
    try:
        async with asyncio.timeout(timeout):
            response = await client.request("GET", url, headers)
            body = await response.read(MAX_LISTING_BYTES)
    except TimeoutError:
        raise MarketError(f"no answer within {timeout:g} s") from None
    except BodyTooLarge:
        raise MarketError(f"its answer is over {MAX_LISTING_BYTES} bytes") from None
    except HttpError as exc:
        raise MarketError(str(exc) or type(exc).__name__) from None
    if response.status != 200:
        raise MarketError(f"HTTP {response.status}")
    try:
        return json.loads(body, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError):
        raise MarketError("its answer is not JSON") from None


class Market:
    """Every provider's current offers; `catalogue` is an immutable snapshot swapped whole on change."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.prices: dict[str, ProviderPrices] = {p.name: ProviderPrices() for p in config.providers}
        self.catalogue = build_catalogue(config.providers, self.prices)
        self.refreshes = 0
        """Reads of every provider finished so far."""
        self._last_refresh = 0.0

    def _update(self, name: str, prices: ProviderPrices) -> None:
        self.prices = {**self.prices, name: prices}
        self.catalogue = build_catalogue(self.config.providers, self.prices)

    def adopt(self, name: str, payload: Any) -> None:
        """Take a provider's `/v1/models` (decoded JSON) as its listing; MarketError when it is not one."""
        previous = self.prices[name]
        prices = adopt_listing(previous, parse_model_list(payload), self.clock(), self.config.routing.max_price_jump)
        for model, jump in prices.held.items():
            if model not in previous.held or previous.held[model].new != jump.new:
                event(logging.WARNING, "price_held", "provider %s: %s; held back: not routed there for %s until "
                      "it comes back", name, jump.describe(), model, provider=name, model=model,
                      factor=None if jump.factor == float("inf") else jump.factor)
        self._update(name, prices)

    def failed(self, name: str, reason: str) -> None:
        """A read failed: the provider's prices are stale until the next one succeeds."""
        if self.prices[name].error != reason:
            event(logging.WARNING, "prices_unreadable", "provider %s: cannot read its prices (%s)", name, reason,
                  provider=name, error=reason)
        self._update(name, replace(self.prices[name], error=reason))

    def model_unknown(self, provider: str, model: str) -> None:
        """The provider said it does not serve `model`: not routed there until the next read."""
        prices = self.prices.get(provider)
        if prices is None or model in prices.dropped:
            return
        event(logging.WARNING, "model_unknown", "provider %s: does not serve %s after all; left out until its "
              "next price read", provider, model, provider=provider, model=model)
        self._update(provider, replace(prices, dropped=prices.dropped | {model}))

    def due(self) -> bool:
        """Whether it is time to read the prices: never read yet, or `price_refresh` seconds since the last read."""
        interval = self.config.routing.price_refresh
        return not self.refreshes or (interval > 0 and time.monotonic() - self._last_refresh >= interval)

    async def refresh(self) -> None:
        """Read every provider's `/v1/models` at once and swap in the new offers."""
        self._last_refresh = time.monotonic()
        routing = self.config.routing
        client = HttpClient(routing.connect_timeout)
        try:
            await asyncio.gather(*(self._read(client, p, routing.connect_timeout + routing.header_timeout)
                                   for p in self.config.providers))
        finally:
            await client.aclose()
        self.refreshes += 1

    async def _read(self, client: HttpClient, provider: ProviderConfig, timeout: float) -> None:
        try:
            key = provider.api_key.get_secret_value() if provider.api_key else None
            payload = await fetch_json(client, provider.url + "/models", timeout, key)
            self.adopt(provider.name, payload)
        except MarketError as exc:
            self.failed(provider.name, str(exc))

    def status(self, provider: ProviderConfig) -> dict[str, Any]:
        """Where a provider's prices come from now, for /health, `providers --live` and `check`."""
        prices = self.prices[provider.name]
        offers = provider_offers(provider, 0, prices)
        sources = {o.source for o in offers}
        return {
            "pricing": provider.pricing,
            "source": sources.pop() if len(sources) == 1 else "none" if not sources else "mixed",
            "stale": prices.stale,
            "error": prices.error,
            "read_at": prices.read_at,
            "models": [o.model for o in offers],
            "held": [{"model": j.model, "factor": round(j.factor, 3) if j.factor != float("inf") else None,
                      "detail": j.describe()} for j in prices.held.values()],
            "dropped": sorted(prices.dropped),
            "skipped": list(prices.skipped),
        }
