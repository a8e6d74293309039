"""What a request will cost at each provider, estimated before it is sent.

Pure: no I/O. What has been learned comes in as plain data and goes out as an `Outlook`, the
one argument the router needs to rank providers:
- How long the reply will be: the output/input token ratio learned per (policy, model) as mean,
  variance and sample count, pooled with what is known for the policy, then the model, then
  everything (`RatioPriors`), capped by the client's `max_tokens`, and kept as a distribution
  (`OutputForecast`), not one number.
- How each provider behaves (`ProviderTrack`): how often it answers, whether its failures may
  have been billed, and how much of its input it serves from a cache, at what price.
The router ranks by `CostEstimate.score`: expected sats per successful answer, plus a small
charge for how much the cost hangs on the reply length, which only decides near ties.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from statistics import NormalDist
from typing import Protocol

from arbstr.pricing import OUTPUT_PLACES, ChargeCheck, Rates, estimate_cost, estimate_msats, msats_cost

RATIO_CLAMP = 4.0
"""Once a pair has a few samples, one sample may move the mean by at most this factor's worth."""
RATIO_WINDOW = 50
"""A plain running mean for the first samples, then an exponential one over about this many."""
PRIOR_WEIGHT = 4.0
"""How many samples a pooled prior counts for against a group's own while that cannot be measured."""
MIN_PRIOR_WEIGHT = 0.25
MAX_PRIOR_WEIGHT = 50.0
"""Bounds of the measured prior weight (see `prior_weight`)."""
DEFAULT_WEIGHT = 1.0
"""How many samples the configured default (reply length or ratio) counts for: a guess, outweighed
by the first answers."""
UNKNOWN_INPUT_RATIO = 1.0
"""With nothing learned and no default_output_ratio set, the ratio assumed for a request whose input
size is unknown (a reply length cannot be turned into a ratio for it)."""
DEFAULT_SPREAD = 1.0
"""With nothing learned at all, the ratio's standard deviation as a multiple of its mean."""
RELIABILITY_WINDOW = 50
"""A provider's success rate is taken over about its last this many attempts."""
RELIABILITY_PRIOR = 2.0
"""Attempts a provider is assumed to have answered besides those seen: one early failure is not a verdict."""
RELIABILITY_HALF_LIFE = 600.0
"""Seconds in which what was seen of a provider's answers and failures fades halfway back to the
priors when nothing new is seen: a provider passed over after a bad start (so never tried again
first) gets its chance back, rather than a few early failures shutting a cheaper provider out."""
_OUTLOOK_REFRESH = RELIABILITY_HALF_LIFE / 64
"""A provider's outlook is rebuilt for fading at most this often (seconds), besides after each change."""
BILLED_PRIOR = 2.0
"""Failures a provider is assumed to have had, half of them billed, before any is seen: a few free
refusals do not yet say that its failures cost nothing, nor a timeout that all of them are billed."""
MIN_SUCCESS_RATE = 0.02
"""Below this a provider's expected cost per answer is treated as this bad, not infinite."""
CACHE_WINDOW = 50
"""The cache-hit share is an exponential mean over about this many answers."""
CHARGE_WINDOW = 50
"""A provider's overcharge rate is taken over about its last this many checked charges."""
OVERCHARGE_MIN_CHECKS = 3
"""Checked charges a provider must have before its overcharge rate can set it aside."""
OVERCHARGE_ACTIONS = ("demote", "exclude", "none")
STANDINGS = ("ok", "overcharging", "demoted", "excluded")
"""What a provider's charges have earned it (`ProviderTrack.standing`)."""

_QUANTILES = 16
_Z = tuple(NormalDist().inv_cdf((i + 0.5) / _QUANTILES) for i in range(_QUANTILES))
"""Standard normal quantiles at which a reply-length distribution is evaluated."""
_FACTOR = Decimal("0.0001")


@dataclass(frozen=True, slots=True)
class RatioStats:
    """A learned output/input token ratio: mean, (population) variance and how many samples."""

    mean: float
    variance: float
    count: float


def update_ratio(current: RatioStats | None, input_tokens: int, output_tokens: int) -> RatioStats:
    """A pair's ratio after one more answer (see `update_stats`)."""
    return update_stats(current, output_tokens / max(1, input_tokens))


def update_stats(current: RatioStats | None, sample: float) -> RatioStats:
    """A learned distribution after one more sample.

    Robust to outliers: from the fourth sample on, a sample is clamped to [mean/4, mean×4] before
    it counts, so one runaway reply cannot swing later estimates. Mean and variance are running
    ones for the first RATIO_WINDOW samples, exponential after, so the estimate follows drift.
    """
    if current is None:
        return RatioStats(sample, 0.0, 1)
    mean, variance, count = current.mean, current.variance, current.count
    if count >= 3 and mean > 0:
        # min(max(sample, low), high) and min(count, RATIO_WINDOW) below, without the calls:
        # every answer updates four of these.
        low, high = mean / RATIO_CLAMP, mean * RATIO_CLAMP
        if low > sample:
            sample = low
        if high < sample:
            sample = high
    count += 1
    weight = 1 / (RATIO_WINDOW if RATIO_WINDOW < count else count)
    delta = sample - mean
    return RatioStats(mean + weight * delta, (1 - weight) * (variance + weight * delta * delta), count)


def pool(parts: Iterable[RatioStats]) -> RatioStats | None:
    """The distribution of all the parts' samples together (each weighted by its count); None if empty."""
    # Lists, not generators, under sum(): the same figures in the same order (so the same float
    # result), without a generator frame per call; this runs several times for every request.
    parts = [p for p in parts if p.count > 0]
    if len(parts) == 1:
        # The sums below of one figure each are that figure (the one model or policy pooled on
        # every rebuild of the priors).
        part = parts[0]
        total = part.count
        mean = total * part.mean / total
        return RatioStats(mean, total * (part.variance + (part.mean - mean) ** 2) / total, total)
    total = sum([p.count for p in parts])
    if not total:
        return None
    mean = sum([p.count * p.mean for p in parts]) / total
    variance = sum([p.count * (p.variance + (p.mean - mean) ** 2) for p in parts]) / total
    return RatioStats(mean, variance, total)


def shrink(own: RatioStats | None, prior: RatioStats, weight: float = PRIOR_WEIGHT) -> RatioStats:
    """`own` pooled with `prior` counted as `weight` samples: the prior leads until `own` has history."""
    if own is None or own.count <= 0:
        return prior
    if weight <= 0:
        pooled = pool([own])
        assert pooled is not None
        return pooled
    # `pool([own, prior as weight samples])` written out for two parts: the same sums of the same
    # figures, without the lists and the intermediate RatioStats (every request shrinks four times).
    count = own.count
    total = sum((count, weight))
    mean = sum((count * own.mean, weight * prior.mean)) / total
    variance = sum((count * (own.variance + (own.mean - mean) ** 2),
                    weight * (prior.variance + (prior.mean - mean) ** 2))) / total
    return RatioStats(mean, variance, total)


def prior_weight(*classes: Iterable[RatioStats]) -> float:
    """How many samples a prior should count for against one group's own: Bühlmann–Straub's
    credibility constant, the spread of samples within groups over the spread of the groups' means
    around their class's mean (a class: groups that share a prior, such as the variants of one
    pair). Groups that differ much give their own history weight quickly; alike ones lean on the
    pool. Both spreads are measured relative to the means, since reply lengths vary in proportion
    to their size (a policy answering at five times its input varies by far more tokens than one
    answering at a tenth of it), and both are the unbiased estimates: one sample says nothing of
    the spread within its group, and a few samples' means differ by chance. PRIOR_WEIGHT until it
    can be measured (two groups of one class with history, and some group with two samples)."""
    # One pass over the groups (the priors are rebuilt after every answer): the deviations of each
    # class's means are summed now, and what the within spread accounts for is taken off at the end.
    within_sum = dof = deviations = chance = spread = 0.0
    for members in classes:
        kept: list[RatioStats] = []
        total = weighted = squares = 0.0
        for group in members:
            count, mean = group.count, group.mean
            if count > 0 and mean > 0:
                kept.append(group)
                within_sum += count * group.variance / (mean * mean)
                dof += count - 1
                total += count
                weighted += count * mean
                squares += count * count
        if len(kept) < 2:
            continue
        pooled = weighted / total
        deviations += sum([g.count * (g.mean / pooled - 1) ** 2 for g in kept])
        chance += len(kept) - 1
        spread += total - squares / total
    if dof <= 0 or spread <= 0:
        return PRIOR_WEIGHT
    within = within_sum / dof
    between = (deviations - chance * within) / spread
    if between <= 0:
        return MAX_PRIOR_WEIGHT
    return min(max(within / between, MIN_PRIOR_WEIGHT), MAX_PRIOR_WEIGHT)


def _class_weight(*classes: Collection[RatioStats]) -> float:
    """`prior_weight(*classes)`, without going through the groups when no class has two of them
    (one policy, one model...): the spread of the groups' means cannot be measured then, and
    prior_weight says PRIOR_WEIGHT."""
    return prior_weight(*classes) if _measurable(classes) else PRIOR_WEIGHT


def _measurable(classes: Iterable[Collection[RatioStats]]) -> bool:
    """Some class has two groups: without, prior_weight is PRIOR_WEIGHT whatever their figures."""
    for members in classes:
        if len(members) > 1:
            return True
    return False


ANY_MODEL = "*"
"""The model key of a policy's ratio pooled over every model (the ledger keeps one per policy)."""
VARIANT_OPEN = "["
"""Learning keys of request shapes within a policy are `policy[signals]`; policy names cannot hold '['."""


@functools.lru_cache(maxsize=1024)  # a few policies × a few shapes, asked twice for every request
def variant_key(policy: str, signals: frozenset[str]) -> str:
    """The learning key of a request shape within its policy: `code[json+tools]`, and `code[]` for
    requests without signals (learned apart too, so that a policy's long conversations, say, do
    not shorten the forecast for its first turns)."""
    return f"{policy}{VARIANT_OPEN}{'+'.join(sorted(signals))}]"


@functools.lru_cache(maxsize=1024)
def _variant_policy(variant: str) -> str:
    return variant[:variant.index(VARIANT_OPEN)]


class RatioPriors:
    """Learned reply lengths, pooled, answering `ratio(policy, model, signals, input_tokens)`; kept
    up to date after an answer by `learned_again`.

    Within a policy, replies scale with the input: ratios are learned per (policy, model), and per
    (policy, ANY_MODEL) over all its models (which also holds what was learned before ratios were
    kept per model); without that row a policy's pairs are pooled. Across policies
    it is reply lengths that compare (a long document is summarised in a few hundred tokens, a
    short prompt written out in as many), so the levels above a policy are output-token
    distributions (`replies`, by model), divided by the request's input. A new pair starts from its
    policy's pooled ratio, which starts from the model's replies, which start from everything's,
    which start from `default`. At each level the prior counts for `prior_weight` samples against a
    group's own history, measured from how much the groups of that level differ. Each request is
    learned under its shape's variant too (`policy[signals]`: tools, JSON mode..., `policy[]`
    without signals), with its pair as prior.
    """

    def __init__(self, learned: Mapping[tuple[str, str], RatioStats], default: RatioStats,
                 replies: Mapping[str, RatioStats] | None = None, default_replies: RatioStats | None = None) -> None:
        self.learned = learned
        self.default = default
        self.default_replies = default_replies
        """The reply length assumed with nothing learned (the ratio `default` then only serves
        requests whose input size is unknown); None: `default` is the assumption."""
        self.replies = dict(replies or {})
        by_policy: dict[str, list[RatioStats]] = {}
        pooled: dict[str, RatioStats] = {}
        variants: dict[tuple[str, str], list[RatioStats]] = {}
        self._places: dict[tuple[str, str], tuple[list[RatioStats], int]] = {}
        """Where each pair's and each variant's figures sit in the class its weight is measured over."""
        for key, stats in learned.items():
            policy, model = key
            if model == ANY_MODEL:
                pooled[policy] = stats
                continue
            if VARIANT_OPEN in policy:
                members = variants.setdefault((_variant_policy(policy), model), [])
            else:
                members = by_policy.setdefault(policy, [])
            self._places[key] = (members, len(members))
            members.append(stats)
        self._pooled, self._rows = frozenset(pooled), len(learned)
        # A pair's prior is its policy: the pairs are measured against their policy's other models,
        # and the variants against the other shapes of their pair.
        self._pairs, self._variants = by_policy, variants
        # A policy's own pooled row wins over pooling its pairs: only those without one are pooled.
        # (In the same key order as before, so the weights below sum in the same order.)
        self.by_policy = {name: pooled[name] if name in pooled else pool(parts) for name, parts in by_policy.items()}
        self.by_policy.update((name, stats) for name, stats in pooled.items() if VARIANT_OPEN not in name)
        self.all_replies = pool(self.replies.values())
        self.model_weight = _class_weight(self.replies.values())
        self.policy_weight = _class_weight(self.by_policy.values())
        self.pair_weight = _class_weight(*by_policy.values())
        self.variant_weight = _class_weight(*variants.values())

    def learned_again(self, keys: Iterable[tuple[str, str]], model: str, replies: RatioStats) -> bool:
        """Bring the priors up to date after `learned[key]` changed for each of `keys` and `model`'s
        replies became `replies`: what a rebuild over the same rows gives (the same functions over
        the same figures in the same order), without going through every row again, since every
        answer changes a few. False when a row or the model is new to them: then only a rebuild
        will do, and these priors, perhaps updated in part, are to be dropped."""
        learned, places, pooled = self.learned, self._places, self._pooled
        if len(learned) != self._rows or model not in self.replies:
            return False
        policies = pairs = variants = False
        for key in keys:
            policy, row_model = key
            stats = learned[key]
            if row_model == ANY_MODEL:
                if policy not in pooled:
                    return False
                if VARIANT_OPEN not in policy:
                    self.by_policy[policy], policies = stats, True
                continue
            place = places.get(key)
            if place is None:
                return False
            members, index = place
            members[index] = stats
            if VARIANT_OPEN in policy:
                variants = True
            else:
                pairs = True
                if policy not in pooled:
                    self.by_policy[policy], policies = pool(members), True
        self.replies[model] = replies
        self.all_replies = pool(self.replies.values())
        # Weights are measured again only where a class has two groups (the others stay PRIOR_WEIGHT).
        if len(self.replies) > 1:
            self.model_weight = prior_weight(self.replies.values())
        if policies and len(self.by_policy) > 1:
            self.policy_weight = prior_weight(self.by_policy.values())
        if pairs and _measurable(self._pairs.values()):
            self.pair_weight = prior_weight(*self._pairs.values())
        if variants and _measurable(self._variants.values()):
            self.variant_weight = prior_weight(*self._variants.values())
        return True

    def ratio(self, policy: str, model: str, signals: frozenset[str] = frozenset(),
              input_tokens: int = 0) -> RatioStats:
        """The assumption `shrink`ing down the levels: everything's replies, the model's, the policy,
        the pair, the shape, each counted against the level above by its weight (> 0). Worked out on
        plain floats with `shrink`'s operations in its order (the same figures): every request asks
        once, and a RatioStats per level cost more than the arithmetic."""
        learned, n = self.learned, input_tokens
        if n > 0 and self.default_replies is not None:
            assumed = self.default_replies
            mean, variance, count = assumed.mean / n, assumed.variance / n ** 2, assumed.count
        else:
            assumed = self.default
            mean, variance, count = assumed.mean, assumed.variance, assumed.count
        for own, weight, per_input in (
                (self.all_replies, DEFAULT_WEIGHT, True), (self.replies.get(model), self.model_weight, True),
                (self.by_policy.get(policy), self.policy_weight, False),
                (learned.get((policy, model)), self.pair_weight, False),
                (learned.get((variant_key(policy, signals), model)), self.variant_weight, False)):
            if own is None or own.count <= 0 or (per_input and n <= 0):
                continue
            own_count = own.count
            if per_input:
                own_mean, own_variance = own.mean / n, own.variance / n ** 2
            else:
                own_mean, own_variance = own.mean, own.variance
            total = own_count + weight
            pooled = (own_count * own_mean + weight * mean) / total
            variance = (own_count * (own_variance + (own_mean - pooled) ** 2)
                        + weight * (variance + (mean - pooled) ** 2)) / total
            mean, count = pooled, total
        return RatioStats(mean, variance, count)


def default_ratio(mean: float) -> RatioStats:
    """What is assumed with nothing learned: `mean` (the config's default_output_ratio), widely spread."""
    return RatioStats(mean, (mean * DEFAULT_SPREAD) ** 2, 0)


def default_replies(tokens: int) -> RatioStats:
    """What is assumed with nothing learned: replies of `tokens` (the config's default_reply_tokens),
    widely spread."""
    return RatioStats(float(tokens), (tokens * DEFAULT_SPREAD) ** 2, 0)


@dataclass(slots=True)
class OutputForecast:
    """How many tokens the reply is expected to have: mean and standard deviation, after the cap.

    Not frozen, though nothing changes it once made: every request makes one (see `CostEstimate`)."""

    mean: float
    sd: float = 0.0

    @property
    def tokens(self) -> int:
        """The expected reply length as a whole number of tokens, for records and display."""
        return max(1, round(self.mean))


def forecast_output(input_tokens: int, ratio: RatioStats, cap: int | None) -> OutputForecast:
    """The reply length when the ratio is lognormal with the learned mean and variance, capped at `cap`.

    The expectation is taken over the capped distribution: with a cap, E[min(out, cap)] is below
    min(E[out], cap), which is what a request with a tight `max_tokens` really costs.
    """
    expected = max(1.0, input_tokens * ratio.mean)
    if ratio.variance <= 0 or ratio.mean <= 0:
        return OutputForecast(float(min(expected, cap) if cap else expected))
    sigma2 = math.log1p(ratio.variance / ratio.mean ** 2)
    sigma, half, exp = math.sqrt(sigma2), sigma2 / 2, math.exp
    points = [exp(sigma * z - half) for z in _Z]
    scale = expected * _QUANTILES / sum(points)  # so the uncapped points keep the exact mean
    # The points rise with z: when the lowest is a token or more, no point is raised to one, and
    # when the highest is within the cap, none is capped (the same figures, without the passes).
    if points[0] * scale >= 1.0:
        points = [p * scale for p in points]
    else:
        points = [max(1.0, p * scale) for p in points]
    if cap and points[-1] > cap:
        points = [min(p, cap) for p in points]
    mean = sum(points) / _QUANTILES
    variance = sum([(p - mean) ** 2 for p in points]) / _QUANTILES
    return OutputForecast(mean, math.sqrt(variance))


@dataclass(slots=True)
class RequestShape:
    """What the estimator reads about a request.

    Not frozen, though nothing changes it once made: every request makes one (see `CostEstimate`)."""

    policy: str
    model: str
    input_tokens: int
    max_output_tokens: int | None = None
    signals: frozenset[str] = frozenset()
    """What the request says about its reply: `tools`, `json`, `usage` (stream_options), `long` (history)."""


class OutputPredictor(Protocol):
    """Forecasts a reply's length. The ratio predictor below is the default; a smarter one can replace it."""

    def forecast(self, shape: RequestShape) -> OutputForecast: ...


class RatioPredictor:
    """Reply length = input tokens × the pooled learned ratio for the shape, capped by max_tokens."""

    def __init__(self, priors: RatioPriors) -> None:
        self.priors = priors

    def forecast(self, shape: RequestShape) -> OutputForecast:
        ratio = self.priors.ratio(shape.policy, shape.model, shape.signals, shape.input_tokens)
        return forecast_output(shape.input_tokens, ratio, shape.max_output_tokens)


def learned_rows(policy: str, model: str) -> tuple[tuple[str, str], ...]:
    """The learned ratios one sample for (policy, model) updates: the pair's, and a policy's pooled
    over its models (ANY_MODEL). A shape within a policy (`code[json]`) has no pooled row: its
    prior is its pair, so nothing would read one."""
    return ((policy, model),) if VARIANT_OPEN in policy else ((policy, model), (policy, ANY_MODEL))


def learning_keys(shape: RequestShape) -> list[tuple[str, str]]:
    """The (policy, model) keys an answer to this request teaches: the pair, and its variant if any."""
    return list(_answer_keys(shape.policy, shape.model, shape.signals)[0])


@functools.lru_cache(maxsize=1024)  # a few policies × models × shapes; every answer asks
def _answer_keys(policy: str, model: str, signals: frozenset[str]) -> tuple[tuple[tuple[str, str], ...],
                                                                            tuple[tuple[str, str], ...]]:
    keys = ((policy, model), (variant_key(policy, signals), model))
    return keys, tuple(row for key in keys for row in learned_rows(*key))


def learning_rows(shape: RequestShape) -> tuple[tuple[str, str], ...]:
    """Every learned row an answer to this request updates: `learned_rows` of each `learning_keys`."""
    return _answer_keys(shape.policy, shape.model, shape.signals)[1]


@dataclass(frozen=True, slots=True)
class ProviderOutlook:
    """What a provider's record says about sending it a request."""

    success_rate: float = 1.0
    """Of recent attempts, the share that answered (with the prior counted in)."""
    charged_failure_share: float = 0.0
    """Of its failures, the share that may have been billed (timeouts, broken answers), with the
    prior (BILLED_PRIOR) counted in."""
    input_factor: Decimal = Decimal(1)
    """Effective input price as a share of the advertised one: below 1 when cache reads are cheaper."""
    charge_factor: Decimal = Decimal(1)
    """What it really bills as a share of its advertised prices, when that is more (an overcharger)."""
    overcharging: str | None = None
    """Why it counts as overcharging (its overcharge rate passed the threshold), else None."""
    demoted: bool = False
    """Overcharging, and `overcharge_action = "demote"`: it goes after every provider that is not."""
    excluded: bool = False
    """Overcharging, and `overcharge_action = "exclude"`: it is not routed to."""
    unit_factors: bool = field(init=False, repr=False, compare=False)
    """Both factors are 1: its estimates are the plain price of the tokens."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "unit_factors", self.input_factor == 1 and self.charge_factor == 1)

    @property
    def failures_per_answer(self) -> float:
        """Failed attempts to expect for each answer it gives."""
        success = max(self.success_rate, MIN_SUCCESS_RATE)
        return (1 - success) / success


@dataclass(slots=True, eq=False)
class CostEstimate:
    """One offer's estimate for one request. Not frozen, though nothing changes it once made: a plan
    makes one for every offer of the model, and a frozen dataclass's __init__ (object.__setattr__
    per field) cost more than the estimate itself."""

    spread: float
    """Standard deviation of the cost from the uncertain reply length, in sats."""
    score: float
    """What the router ranks by: expected sats per successful answer, plus risk_aversion × spread.
    A float: it only orders candidates, and equal costs still give equal scores."""
    _cost: Decimal | None = field(default=None, repr=False)
    _msats: int = field(default=0, repr=False)
    _rates: Rates | None = field(default=None, repr=False)

    @property
    def cost(self) -> Decimal:
        """Expected sats if this provider answers (exact for the expected token counts). Made when
        first asked: a plan estimates every offer, and only a few costs are ever read."""
        if self._cost is None:
            self._cost = msats_cost(self._msats, self._rates)
        return self._cost

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CostEstimate):
            return NotImplemented
        return (self.cost, self.spread, self.score) == (other.cost, other.spread, other.score)

    def __hash__(self) -> int:
        return hash((self.cost, self.spread, self.score))


def milli_tokens(tokens: float) -> int:
    """`tokens` in thousandths, rounded half to even: `Decimal(tokens).quantize(Decimal("0.001"))`
    scaled to an integer, worked out from the float's exact fraction without making a Decimal
    (every request's Outlook needs it)."""
    numerator, denominator = tokens.as_integer_ratio()
    milli, rest = divmod(numerator * 10 ** OUTPUT_PLACES, denominator)
    if 2 * rest > denominator or (2 * rest == denominator and milli % 2):
        milli += 1
    return milli


@dataclass(slots=True)
class Outlook:
    """The estimator's output for one request: the reply-length forecast and each provider's record.

    Not frozen, though nothing changes it once made: every request makes one (see `CostEstimate`)."""

    output: OutputForecast
    providers: Mapping[str, ProviderOutlook]
    risk_aversion: float = 0.0
    """Sats of score per sat of cost spread: prefers providers less sensitive to reply length on near ties."""
    failure_penalty: float = 0.0
    """Sats a failed attempt costs the user beyond any charge (the wait), for ranking only."""
    _output_milli: int = field(init=False, repr=False, compare=False)
    """The expected reply length in thousandths of a token, rounded half to even (as Decimal's
    quantize rounds): see `milli_tokens`."""

    def __post_init__(self) -> None:
        self._output_milli = milli_tokens(self.output.mean)

    def estimate(self, provider: str, rates: Rates, input_tokens: int,
                 record: ProviderOutlook | None = None) -> CostEstimate:
        """`record`: the provider's, when the caller has already looked it up (else it is looked up here)."""
        if record is None:
            record = self.providers.get(provider, _NEUTRAL)
        spread = self.output.sd * rates.output_float / 1000
        cost, msats = None, 0
        exact = estimate_msats(rates, input_tokens, self._output_milli) if record.unit_factors else None
        if exact is not None:
            msats, cost_float = exact
        else:
            inputs = input_tokens if record.input_factor == 1 else input_tokens * record.input_factor
            cost = estimate_cost(rates, inputs, Decimal(self._output_milli).scaleb(-OUTPUT_PLACES))
            if record.charge_factor != 1:
                cost *= record.charge_factor
            cost_float = float(cost)
        score = cost_float + self.risk_aversion * spread
        if record.success_rate < 1:
            # A provider that fails with probability 1-s is tried, then the next: ordering by
            # (expected spend at it) / s minimises the expected total of the whole plan.
            failures = record.failures_per_answer
            score += failures * (record.charged_failure_share * cost_float + self.failure_penalty)
        return CostEstimate(spread, score, cost, msats, rates)


_NEUTRAL = ProviderOutlook()
_UNIT_FACTOR = Decimal(1).quantize(_FACTOR)


def _factor(value: float) -> Decimal:
    """A price factor as the estimates use it. Most providers' are exactly 1 (no cache reads, no
    overcharge), and every answer rebuilds a provider's outlook: that case needs no Decimal made."""
    return _UNIT_FACTOR if value == 1.0 else Decimal(value).quantize(_FACTOR)


@dataclass(slots=True)
class _Record:
    answered: float = 0.0
    failures: float = 0.0
    charged_failures: float = 0.0
    """Answers and failures seen (each fading per later attempt and with time), priors apart."""
    seen_at: float = 0.0
    """When the figures above were last brought up to date (the clock's time)."""
    cache_share: float = 0.0
    cache_price: float = 1.0
    cache_samples: int = 0
    checks: float = 0.0
    overcharges: float = 0.0
    charge_factor: float = 1.0
    totals: ChargeTotals = field(default_factory=lambda: ChargeTotals())
    outlook: ProviderOutlook | None = None
    """Built on demand from the figures above; made again when they change to different ones."""
    outlook_at: float = 0.0
    changed: bool = False
    """The figures above changed since `outlook` was made."""
    made_from: tuple = ()
    """What `outlook` was made from: the same after a change (an answer from a provider that never
    failed leaves its success rate at 1), it is kept, not made again."""


@dataclass(slots=True)
class ChargeTotals:
    """A provider's checked charges since start, for people: /health and the log."""

    checked: int = 0
    overcharged: int = 0
    overcharged_msats: int = 0
    """The sum of what overcharged requests were billed above the advertised price."""


class ProviderTrack:
    """Each provider's recent record: answers and failures, cache reads, charges against its
    advertised prices. Pure bookkeeping.

    A provider whose recent overcharge rate passes `overcharge_threshold` (after
    OVERCHARGE_MIN_CHECKS checks) counts as overcharging, and `overcharge_action` says what the
    router does with it: `demote` (after every other provider), `exclude`, or `none`.
    """

    def __init__(self, overcharge_threshold: float = 0.2, overcharge_action: str = "demote",
                 clock: Callable[[], float] = time.monotonic) -> None:
        if overcharge_action not in OVERCHARGE_ACTIONS:
            raise ValueError(f"overcharge_action must be one of {', '.join(OVERCHARGE_ACTIONS)}")
        self.overcharge_threshold = overcharge_threshold
        self.overcharge_action = overcharge_action
        self.clock = clock
        self._records: dict[str, _Record] = {}

    def _record(self, provider: str) -> _Record:
        record = self._records.get(provider)
        if record is None:
            record = self._records[provider] = _Record(seen_at=self.clock())
        return record

    def answered(self, provider: str) -> None:
        record = self._decay(provider)
        record.answered += 1

    def failed(self, provider: str, charged: bool) -> None:
        """An attempt that got no answer; `charged` when it may have been billed (it reached the provider)."""
        record = self._decay(provider)
        record.failures += 1
        record.charged_failures += charged

    def _decay(self, provider: str) -> _Record:
        record = self._record(provider)
        record.changed = True
        now = self.clock()
        keep = (1 - 1 / RELIABILITY_WINDOW) * _faded(record, now)
        record.answered *= keep
        record.failures *= keep
        record.charged_failures *= keep
        record.seen_at = now
        return record

    def cache_reads(self, provider: str, prompt_tokens: int, cached_tokens: int, cached_msats: int | None,
                    input_msats_per_token: Decimal) -> None:
        """One answer's cache use: `cached_tokens` of `prompt_tokens` were read from cache, for
        `cached_msats` (None: not reported, taken at the full input price)."""
        if prompt_tokens <= 0:
            return
        record = self._record(provider)
        record.changed = True
        record.cache_samples += 1
        weight = 1 / min(record.cache_samples, CACHE_WINDOW)
        share = min(cached_tokens, prompt_tokens) / prompt_tokens
        record.cache_share += weight * (share - record.cache_share)
        if cached_tokens > 0 and cached_msats is not None and input_msats_per_token > 0:
            price = float(Decimal(cached_msats) / (cached_tokens * input_msats_per_token))
            record.cache_price += weight * (min(price, 1.0) - record.cache_price)

    def charged(self, provider: str, check: ChargeCheck) -> bool:
        """One reported charge checked against the advertised prices; True when it was an overcharge."""
        record = self._record(provider)
        record.changed = True
        overcharged = check.overcharged  # a property: every answer's charge is checked
        keep = 1 - 1 / CHARGE_WINDOW
        record.checks = record.checks * keep + 1
        record.overcharges = record.overcharges * keep + overcharged
        if check.advertised_msats > 0:
            ratio = max(1.0, check.reported_msats / check.advertised_msats)
            record.charge_factor += (ratio - record.charge_factor) / min(record.totals.checked + 1, CHARGE_WINDOW)
        totals = record.totals
        totals.checked += 1
        if overcharged:
            totals.overcharged += 1
            totals.overcharged_msats += check.difference_msats
        return overcharged

    def charges(self, provider: str) -> ChargeTotals:
        record = self._records.get(provider)
        return record.totals if record else ChargeTotals()

    def outlook(self, provider: str, now: float | None = None) -> ProviderOutlook:
        record = self._records.get(provider)
        if record is None:
            return _NEUTRAL
        if now is None:
            now = self.clock()
        if record.outlook is None or record.changed or now - record.outlook_at >= _OUTLOOK_REFRESH:
            fade = _faded(record, now)
            answered, failures = record.answered * fade, record.failures * fade
            overcharging = None
            rate = record.overcharges / record.checks if record.checks else 0.0
            if record.totals.checked >= OVERCHARGE_MIN_CHECKS and rate > self.overcharge_threshold:
                overcharging = (f"charged above its advertised prices on {record.totals.overcharged} of "
                                f"{record.totals.checked} checked requests")
            made_from = ((answered + RELIABILITY_PRIOR) / (answered + failures + RELIABILITY_PRIOR),
                         (record.charged_failures * fade + BILLED_PRIOR / 2) / (failures + BILLED_PRIOR),
                         1 - record.cache_share * (1 - record.cache_price), record.charge_factor, overcharging)
            record.outlook_at, record.changed = now, False
            if record.outlook is None or made_from != record.made_from:
                success_rate, charged_failure_share, input_factor, charge_factor, overcharging = made_from
                record.made_from = made_from
                record.outlook = ProviderOutlook(
                    success_rate=success_rate, charged_failure_share=charged_failure_share,
                    input_factor=_factor(input_factor), charge_factor=_factor(charge_factor), overcharging=overcharging,
                    demoted=overcharging is not None and self.overcharge_action == "demote",
                    excluded=overcharging is not None and self.overcharge_action == "exclude",
                )
        return record.outlook

    def standing(self, provider: str) -> str:
        """`ok`, or what its overcharging earned it: `overcharging` (action none), `demoted`, `excluded`."""
        outlook = self.outlook(provider)
        if outlook.overcharging is None:
            return "ok"
        return "demoted" if outlook.demoted else "excluded" if outlook.excluded else "overcharging"

    def outlooks(self, providers: Iterable[str]) -> dict[str, ProviderOutlook]:
        now = self.clock()
        return {name: self.outlook(name, now) for name in providers}


def _faded(record: _Record, now: float) -> float:
    """How much of a record's answers and failures still counts, by the time since it was updated."""
    elapsed = now - record.seen_at
    return 0.5 ** (elapsed / RELIABILITY_HALF_LIFE) if elapsed > 0 else 1.0
