"""Route planning: given what a request needs and what providers offer, an ordered plan of candidates.

Pure: no I/O, no mitmproxy. Provider state that changes at run time (the estimator's outlook for
the request, providers that are down) comes in as plain arguments, so the same function serves the
proxy, the tests and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any
from dataclasses import dataclass
from decimal import Decimal

from arbstr.config import ProviderConfig
from arbstr.errors import InsufficientFunds, ModelNotAllowed, ModelNotFound, NoEligibleProvider
from arbstr.estimator import CostEstimate, Outlook
from arbstr.policy import NO_PINNING, Pinning, Policy
from arbstr.pricing import Rates, format_sats

_LISTED_MODELS = 20
"""How many model names an error message lists before it says 'and N more'."""


@dataclass(frozen=True, slots=True)
class ProviderOffer:
    """One provider's price for one model."""

    provider: str
    model: str
    rates: Rates
    """What estimates charge: the figures the provider bills."""
    rank: int
    """The provider's position in the config: breaks ties, so the user's order is the preference."""
    advertised_fee: Decimal = Decimal(0)
    """The per-request fee the provider advertises (shown to people; in `rates` only when it is billed)."""
    max_cost: Decimal | None = None
    """The most one request may cost: what the provider reserves from the balance before answering."""
    context_length: int | None = None
    source: str = "config"
    """Where the price comes from: `live` (its /v1/models), `config`, or `fallback` (config, because the
    provider could not be read), `stale` (the last live read, because it could not be read since)."""
    payment_overhead: Decimal = Decimal(0)
    """Sats the way the provider is paid adds to each request beyond its bill (X-Cashu's rounding to
    whole sats): counted in `rates.per_request`, never in what its charges are checked against."""

    @property
    def billed_rates(self) -> Rates:
        """The rates the provider itself bills: `rates` without the payment's overhead."""
        if not self.payment_overhead:
            return self.rates
        return Rates(self.rates.input_per_1k, self.rates.output_per_1k, self.rates.per_request - self.payment_overhead)


class Catalogue:
    """Every offer, indexed by model; each model's offers in rank order (the user's preference)."""

    def __init__(self, offers: Iterable[ProviderOffer]) -> None:
        by_model: dict[str, list[ProviderOffer]] = {}
        for offer in offers:
            by_model.setdefault(offer.model, []).append(offer)
        self.by_model: dict[str, tuple[ProviderOffer, ...]] = {
            m: tuple(sorted(o, key=_rank)) for m, o in by_model.items()}

    @classmethod
    def from_providers(cls, providers: Iterable[ProviderConfig]) -> Catalogue:
        """The offers the config alone makes: every configured model that has a configured price."""
        return cls(config_offer(p, model, rank) for rank, p in enumerate(providers) for model in p.priced_models)

    def models(self) -> list[str]:
        return sorted(self.by_model)


def config_offer(provider: ProviderConfig, model: str, rank: int, source: str = "config") -> ProviderOffer:
    """One configured model's offer (it must have a configured price)."""
    rates = provider.configured_rates(model)
    assert rates is not None
    own = provider.models.get(model)
    return ProviderOffer(provider.name, model, rates, rank, rates.per_request,
                         own.max_cost if own else None, own.context_length if own else None, source)


@dataclass(slots=True)
class RouteRequest:
    """The facts about a request that routing needs (what bounds its reply is in the estimator's outlook).

    Not frozen, though nothing changes it once made: every request makes one (see `Candidate`)."""

    model: str
    input_tokens: int
    pinning: Pinning = NO_PINNING
    """Providers the client pinned (X-Arbstr-Provider) and whether it allows fallback (X-Arbstr-Fallback)."""


@dataclass(slots=True)
class Candidate:
    """Not frozen, though nothing changes it once made: a plan makes one for every offer of the
    model, and a frozen dataclass's __init__ costs twice as much (object.__setattr__ per field)."""

    offer: ProviderOffer
    estimate: CostEstimate
    demoted: bool = False
    """Its charges went over its advertised prices too often: ranked after every provider that is not."""

    @property
    def provider(self) -> str:
        return self.offer.provider

    @property
    def estimated_cost(self) -> Decimal:
        """Expected sats if this provider answers."""
        return self.estimate.cost


@dataclass(frozen=True, slots=True)
class Exclusion:
    provider: str
    reason: str


@dataclass(frozen=True, slots=True)
class Unpayable:
    """Why the wallet cannot pay a provider now: its node takes another mint's ecash, or the
    wallet holds less than paying it needs (`shortfall_sats`)."""

    reason: str
    shortfall_sats: int | None = None


@dataclass(slots=True)
class RoutePlan:
    """Candidates in the order to try them, with the estimates that ordered them.

    Not frozen, though nothing changes it once made: every request makes one (see `Candidate`)."""

    policy: str
    model: str
    input_tokens: int
    output_tokens: int
    candidates: tuple[Candidate, ...]
    exclusions: tuple[Exclusion, ...] = ()
    """Providers the policy ruled out, with why."""
    deferred: tuple[Exclusion, ...] = ()
    """Providers that are unavailable now: still in the plan, after every available one, as a last resort."""
    held_back: tuple[Exclusion, ...] = ()
    """Eligible providers left out because they cost more than the policy's max_price_ratio allows."""
    allow_fallback: bool = True
    """False: only the first candidate may be tried; its failure is the answer."""

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def candidate(self, provider: str) -> Candidate:
        return next(c for c in self.candidates if c.provider == provider)


def _rank(offer: ProviderOffer) -> int:
    return offer.rank


def _cheapest(candidate: Candidate) -> tuple[bool, Decimal, Decimal, int]:
    # Near ties (score equal to the millisat) go to the provider whose cost hangs least on the reply length.
    return candidate.demoted, candidate.estimate.score, candidate.estimate.spread, candidate.offer.rank


STRATEGIES: dict[str, Callable[[Candidate], Any]] = {"cheapest": _cheapest}
"""Sort keys by strategy name; config.STRATEGIES maps the names users write onto these."""


def plan_route(request: RouteRequest, catalogue: Catalogue, policy: Policy, outlook: Outlook,
               unavailable: Mapping[str, str] | None = None,
               unpayable: Mapping[str, Unpayable] | None = None) -> RoutePlan:
    """Order the providers that may serve `request` under `policy`, cheapest first by the policy's strategy.

    `outlook` is the estimator's view of this request (arbstr.estimator): its expected reply length
    and each provider's record; "cheapest" means the least expected sats per successful answer.

    `unavailable` maps provider names to why they should not be used right now (an open breaker):
    they go last, in strategy order, so a request still has a chance when every provider looks
    down. `unpayable` are providers the wallet cannot pay now: left out, so the request goes to
    one it can pay (a key-paid one) before anything is sent. Raises ModelNotFound, ModelNotAllowed
    or NoEligibleProvider (naming what excluded each provider) when no plan exists, and
    InsufficientFunds (naming the smallest shortfall) when only the wallet stood in the way.
    """
    offers = catalogue.by_model.get(request.model)
    if not offers:
        raise ModelNotFound(
            f"The model '{request.model}' is not offered by any configured provider. "
            f"Available models: {_list_models(catalogue.models())}.",
            details={"param": "model"},
        )
    if not policy.allows(request.model):
        raise ModelNotAllowed(
            f"Policy '{policy.name}' does not allow model '{request.model}'; "
            f"allowed: {_list_models(sorted(policy.allowed_models or ()))}.",
            details={"param": "model"},
        )
    allowed = _allowed_providers(policy, request.pinning)
    limited = policy.max_sats_per_1k_output is not None or policy.max_sats_per_request is not None
    records = outlook.providers
    candidates, deferred, exclusions = [], [], []
    unpaid: list[Unpayable] = []
    # Every offer of the model, for every request: the checks that rule nothing out are skipped.
    for offer in offers:
        provider = offer.provider
        record = records.get(provider)
        estimate = outlook.estimate(provider, offer.rates, request.input_tokens, record)
        if allowed is not None and provider not in allowed:
            reason = _pin_reason(offer, policy, request.pinning, allowed)
        elif record is not None and record.excluded:
            reason = record.overcharging
        elif limited or offer.context_length is not None:
            reason = _exclusion_reason(offer, estimate, policy, request.input_tokens)
        else:
            reason = None
        if not reason and unpayable and provider in unpayable:
            reason = unpayable[provider].reason
            unpaid.append(unpayable[provider])
        if reason:
            exclusions.append(Exclusion(provider, reason))
            continue
        candidate = Candidate(offer, estimate, record is not None and record.demoted)
        if unavailable and provider in unavailable:
            deferred.append(candidate)
        else:
            candidates.append(candidate)
    if allowed is not None:
        offering = {o.provider for o in offers}
        exclusions += [Exclusion(name, f"does not offer '{request.model}'") for name in sorted(allowed - offering)]
    if not candidates and not deferred:
        listed = "; ".join(f"{e.provider}: {e.reason}" for e in exclusions)
        if unpaid and len(unpaid) == len(exclusions):
            raise _cannot_pay(request.model, unpaid, listed)
        raise NoEligibleProvider(
            f"No provider of '{request.model}' satisfies policy '{policy.name}': {listed}.",
            details={"exclusions": [{"provider": e.provider, "reason": e.reason} for e in exclusions]},
        )
    held_back = _over_price_ratio(candidates + deferred, policy.max_price_ratio)
    if held_back:
        dear = {e.provider for e in held_back}
        candidates = [c for c in candidates if c.provider not in dear]
        deferred = [c for c in deferred if c.provider not in dear]
    order = STRATEGIES[policy.strategy]
    candidates.sort(key=order)
    deferred.sort(key=order)
    return RoutePlan(policy.name, request.model, request.input_tokens, outlook.output.tokens,
                     tuple(candidates + deferred), tuple(exclusions),
                     tuple(Exclusion(c.provider, unavailable[c.provider]) for c in deferred) if unavailable else (),
                     held_back, policy.allow_fallback and request.pinning.allow_fallback)


def _allowed_providers(policy: Policy, pinning: Pinning) -> frozenset[str] | None:
    """The providers both the policy and the client's pin allow; None when neither restricts them."""
    if policy.providers is None or pinning.providers is None:
        return policy.providers if pinning.providers is None else pinning.providers
    return policy.providers & pinning.providers


def _over_price_ratio(eligible: list[Candidate], ratio: Decimal | None) -> tuple[Exclusion, ...]:
    """Candidates whose estimate is over `ratio` times the cheapest one's: never a fallback, even when
    the cheapest fails."""
    if ratio is None or not eligible:
        return ()
    cheapest = min(c.estimated_cost for c in eligible)
    return tuple(
        Exclusion(c.provider, f"estimated {format_sats(c.estimated_cost)} sats is more than "
                              f"{format_sats(ratio)}× the cheapest candidate's {format_sats(cheapest)} sats "
                              f"(max_price_ratio)")
        for c in eligible if c.estimated_cost > cheapest * ratio)


def _pin_reason(offer: ProviderOffer, policy: Policy, pinning: Pinning, allowed: frozenset[str] | None) -> str | None:
    """Why the client's pin or the policy's providers leave this offer out; None when they allow it."""
    if allowed is None or offer.provider in allowed:
        return None
    if pinning.providers is not None and offer.provider not in pinning.providers:
        return "not pinned by X-Arbstr-Provider"
    return f"not among policy '{policy.name}' providers"


def _cannot_pay(model: str, unpaid: list[Unpayable], listed: str) -> InsufficientFunds:
    shortfalls = [u.shortfall_sats for u in unpaid if u.shortfall_sats is not None]
    return InsufficientFunds(f"The wallet cannot pay any provider of '{model}': {listed}.",
                             details={"shortfall_sats": min(shortfalls)} if shortfalls else {})


def _exclusion_reason(offer: ProviderOffer, estimate: CostEstimate, policy: Policy, input_tokens: int) -> str | None:
    if offer.context_length is not None and input_tokens > offer.context_length:
        return f"about {input_tokens} input tokens exceed its context length of {offer.context_length}"
    limit = policy.max_sats_per_1k_output
    if limit is not None and offer.rates.output_per_1k > limit:
        return (f"output rate {format_sats(offer.rates.output_per_1k)} sats/1k exceeds "
                f"max_sats_per_1k_output {format_sats(limit)}")
    limit = policy.max_sats_per_request
    if limit is not None and estimate.cost > limit:
        return f"estimated {format_sats(estimate.cost)} sats exceeds max_sats_per_request {format_sats(limit)}"
    return None


def _list_models(models: list[str]) -> str:
    shown = ", ".join(models[:_LISTED_MODELS])
    more = len(models) - _LISTED_MODELS
    return f"{shown} and {more} more" if more > 0 else shown
