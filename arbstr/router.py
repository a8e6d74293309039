"""Route planning: given what a request needs and what providers offer, an ordered plan of candidates.

Pure: no I/O, no mitmproxy. Provider state that changes at run time (learned ratios, providers
that are down) comes in as plain arguments, so the same function serves the proxy, the tests and
the benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from operator import attrgetter
from typing import Any
from dataclasses import dataclass
from decimal import Decimal

from arbstr.config import ProviderConfig
from arbstr.errors import ModelNotAllowed, ModelNotFound, NoEligibleProvider
from arbstr.policy import Policy
from arbstr.pricing import Rates, estimate_cost, format_sats

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


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """The facts about a request that routing needs."""

    model: str
    input_tokens: int
    max_output_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    offer: ProviderOffer
    estimated_cost: Decimal

    @property
    def provider(self) -> str:
        return self.offer.provider


@dataclass(frozen=True, slots=True)
class Exclusion:
    provider: str
    reason: str


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """Candidates in the order to try them, with the estimates that ordered them."""

    policy: str
    model: str
    input_tokens: int
    output_tokens: int
    candidates: tuple[Candidate, ...]
    exclusions: tuple[Exclusion, ...] = ()
    """Providers the policy ruled out, with why."""
    deferred: tuple[Exclusion, ...] = ()
    """Providers that are unavailable now: still in the plan, after every available one, as a last resort."""

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def candidate(self, provider: str) -> Candidate:
        return next(c for c in self.candidates if c.provider == provider)


def _rank(offer: ProviderOffer) -> int:
    return offer.rank


STRATEGIES: dict[str, Callable[[Candidate], Any]] = {"cheapest": attrgetter("estimated_cost")}
"""Sort keys by strategy name; config.STRATEGIES maps the names users write onto these. The sort is
stable and candidates come in rank order, so equal keys keep the user's order."""


def estimate_output_tokens(input_tokens: int, output_ratio: float, max_output_tokens: int | None) -> int:
    """Expected reply length: the learned output/input ratio, capped by the client's own limit."""
    estimate = max(1, math.ceil(input_tokens * output_ratio))
    return min(estimate, max_output_tokens) if max_output_tokens else estimate


def plan_route(request: RouteRequest, catalogue: Catalogue, policy: Policy, output_ratio: float,
               unavailable: Mapping[str, str] | None = None) -> RoutePlan:
    """Order the providers that may serve `request` under `policy`, cheapest first by the policy's strategy.

    `unavailable` maps provider names to why they should not be used right now (an open breaker):
    they go last, in strategy order, so a request still has a chance when every provider looks
    down. Raises ModelNotFound, ModelNotAllowed or NoEligibleProvider (naming what excluded each
    provider) when no plan exists.
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
    input_tokens = request.input_tokens
    output_tokens = estimate_output_tokens(input_tokens, output_ratio, request.max_output_tokens)
    # Decimal × Decimal is quicker than int × Decimal, and this loop runs once per offer.
    exact_in, exact_out = Decimal(input_tokens), Decimal(output_tokens)
    capped = policy.max_sats_per_1k_output is not None or policy.max_sats_per_request is not None
    candidates, deferred, exclusions = [], [], []
    for offer in offers:
        cost = estimate_cost(offer.rates, exact_in, exact_out)
        reason = (_exclusion_reason(offer, cost, policy, input_tokens)
                  if capped or offer.context_length is not None else None)
        if reason:
            exclusions.append(Exclusion(offer.provider, reason))
        elif unavailable and offer.provider in unavailable:
            deferred.append(Candidate(offer, cost))
        else:
            candidates.append(Candidate(offer, cost))
    if not candidates and not deferred:
        listed = "; ".join(f"{e.provider}: {e.reason}" for e in exclusions)
        raise NoEligibleProvider(
            f"No provider of '{request.model}' satisfies policy '{policy.name}': {listed}.",
            details={"exclusions": [{"provider": e.provider, "reason": e.reason} for e in exclusions]},
        )
    order = STRATEGIES[policy.strategy]
    candidates.sort(key=order)
    deferred.sort(key=order)
    return RoutePlan(policy.name, request.model, request.input_tokens, output_tokens,
                     tuple(candidates + deferred), tuple(exclusions),
                     tuple(Exclusion(c.provider, unavailable[c.provider]) for c in deferred) if unavailable else ())


def _exclusion_reason(offer: ProviderOffer, cost: Decimal, policy: Policy, input_tokens: int) -> str | None:
    if offer.context_length is not None and input_tokens > offer.context_length:
        return f"about {input_tokens} input tokens exceed its context length of {offer.context_length}"
    limit = policy.max_sats_per_1k_output
    if limit is not None and offer.rates.output_per_1k > limit:
        return (f"output rate {format_sats(offer.rates.output_per_1k)} sats/1k exceeds "
                f"max_sats_per_1k_output {format_sats(limit)}")
    limit = policy.max_sats_per_request
    if limit is not None and cost > limit:
        return f"estimated {format_sats(cost)} sats exceeds max_sats_per_request {format_sats(limit)}"
    return None


def _list_models(models: list[str]) -> str:
    shown = ", ".join(models[:_LISTED_MODELS])
    more = len(models) - _LISTED_MODELS
    return f"{shown} and {more} more" if more > 0 else shown


RATIO_CLAMP = 4.0
"""Once a policy has a few samples, one sample may move the mean by at most this factor's worth."""
RATIO_WINDOW = 50
"""A plain running mean for the first samples, then an exponential one over about this many."""


def update_output_ratio(current: tuple[float, int] | None, input_tokens: int, output_tokens: int) -> tuple[float, int]:
    """The policy's output/input ratio after one more request: (mean, sample count).

    Robust to outliers: from the fourth sample on, a sample is clamped to [mean/4, mean×4] before
    it counts, so one runaway reply cannot swing later estimates.
    """
    sample = output_tokens / max(1, input_tokens)
    if current is None:
        return sample, 1
    mean, count = current
    if count >= 3 and mean > 0:
        sample = min(max(sample, mean / RATIO_CLAMP), mean * RATIO_CLAMP)
    count += 1
    return mean + (sample - mean) / min(count, RATIO_WINDOW), count
