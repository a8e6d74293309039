"""The routing state of a running arbstr: configuration, policies, offers, what has been learned,
and the ledger every finished request is settled into.

One `Engine` per configuration; a reload builds a new one and swaps it in whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from arbstr.budgets import BudgetKeeper, RequestBudget, budgets_from_config
from arbstr.chat import ChatRequest, parse_chat_request
from arbstr.config import Config
from arbstr.estimator import (Outlook, ProviderTrack, RatioPredictor, RatioPriors, RatioStats,
                              RequestShape, UNKNOWN_INPUT_RATIO, default_ratio, default_replies,
                              learning_keys, learning_rows, update_ratio, update_stats)
from arbstr.exchange import Deadlines, EndState, ProviderEndpoint
from arbstr.health import HealthBook
from arbstr.logs import enabled, event
from arbstr.metrics import Metrics
from arbstr.market import Market
from arbstr.policy import NO_PINNING, Pinning, Policy, PolicyBook, parse_pinning
from arbstr.pricing import ChargeCheck, actual_cost, check_charge, estimate_cost, msats_to_sats
from arbstr.router import Candidate, Catalogue, RoutePlan, RouteRequest, Unpayable, plan_route
from arbstr.store import Ledger, RequestRecord
from arbstr.tokens import estimate_tokens
from arbstr.usage import UsageReport

if TYPE_CHECKING:
    from arbstr.wallet import Wallet

OVERCHARGE_LOG_INTERVAL = 3600.0
"""Seconds between two log lines about the same provider's overcharges."""


INTERRUPTED = "interrupted_by_shutdown"
"""The error of a request still at a provider when arbstr stopped."""


@dataclass(slots=True)
class Decision:
    """Everything decided about one request before it is sent.

    Not frozen, though nothing changes it once made: every request makes one (see `RequestRecord`)."""

    request_id: str
    arrived: float
    """Unix time the request arrived."""
    started: float
    """time.monotonic() when the request arrived, for latencies."""
    chat: ChatRequest
    policy: Policy
    plan: RoutePlan
    shape: RequestShape
    """What the estimator read from the request, and what its answer will teach."""
    app: str | None = None
    """The app the request is attributed to (arbstr.attribution)."""


@dataclass(slots=True)
class Outcome:
    """How a routed request ended, as the addon saw it.

    Not frozen, though nothing changes it once made: every request makes one (see `RequestRecord`)."""

    provider: str | None
    status_code: int | None
    usage: UsageReport | None
    reported_cost_msats: int | None
    finished: float
    """time.monotonic() at the end."""
    first_byte: float | None = None
    """time.monotonic() of the first body byte of a stream."""
    error: str | None = None
    attempts: str = ""
    failures: tuple[tuple[str, str], ...] = ()
    """(provider, cause) of each attempt passed over before the answer (or before giving up)."""
    client_gone: bool = False
    """The client left before the end: says nothing about the provider."""
    paid_msats: int | None = None
    """What the payment itself shows the provider took (an X-Cashu token minus its change, whole
    sats): the cost, whatever the provider reports (its report is what is checked)."""
    paid_elsewhere_msats: int = 0
    """What payments show providers took for attempts that did not answer: added to the cost."""


class Engine:
    def __init__(self, config: Config, ledger: Ledger | None = None, metrics: Metrics | None = None,
                 wallet: Wallet | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.ledger = ledger
        self.metrics = metrics or Metrics()
        self.wallet = wallet
        """The Cashu wallet ([wallet]); None without one."""
        self.node_balances: dict[str, tuple[float, Any]] = {}
        """What each key's node last said about its balance (GET /v1/balances), with when, by key."""
        self.budgets = BudgetKeeper(budgets_from_config(config), ledger, config.budget_alerts.webhook, clock)
        self.payability: Callable[[str, list[str]], Mapping[str, Unpayable]] | None = None
        """Which providers of a model the wallet cannot pay now, with why (WalletPayments.unpayable)."""
        self.money: dict[str, Any] = {"wallet": None, "providers": []}
        """The wallet's sats and what each provider's keys hold, as /health or /metrics last read them."""
        self.policies = PolicyBook.from_config(config.policies)
        self.market = Market(config)
        self.endpoints = {
            p.name: ProviderEndpoint(p.name, p.url, p.api_key.get_secret_value() if p.api_key else "")
            for p in config.providers
        }
        self.learned: dict[tuple[str, str], RatioStats] = {}
        """Learned ratios by (policy, model), and by (policy, ANY_MODEL) pooled over its models: as the
        ledger last loaded them (with what other instances learned), plus what this one learned since."""
        self._learned_version = -1
        self.replies: dict[str, RatioStats] = {}
        """Output tokens of every answer, by model: the levels of the priors above a policy (this
        instance's own, since it started)."""
        self._priors: RatioPriors | None = None
        # What the priors assume with nothing learned: the same for every rebuild.
        ratio = config.routing.default_output_ratio
        self._default_ratio = default_ratio(ratio or UNKNOWN_INPUT_RATIO)
        self._default_replies = None if ratio else default_replies(config.routing.default_reply_tokens)
        self._in_flight: dict[str, tuple[Decision, str | None]] = {}
        """Requests sent to a provider and not settled yet, by request id."""
        self._interrupted: dict[str, RequestRecord] = {}
        self._sync_learned()
        routing = config.routing
        self.deadlines = Deadlines(routing.connect_timeout, routing.header_timeout, routing.body_timeout,
                                   routing.stream_idle_timeout, max_body_bytes=routing.max_response_bytes)
        self.track = ProviderTrack(routing.overcharge_threshold, routing.overcharge_action)
        self._overcharge_logged: dict[str, float] = {}
        self.health = HealthBook([p.name for p in config.providers], routing.failure_threshold, routing.cooldown,
                                 routing.funds_cooldown,
                                 probe_timeout=routing.connect_timeout + routing.header_timeout + routing.body_timeout)

    @property
    def catalogue(self) -> Catalogue:
        """The market's current offers: a snapshot, replaced whole when prices are read."""
        return self.market.catalogue

    def model_unknown(self, provider: str, model: str) -> None:
        """A provider answered that it does not serve `model`: stop routing it there until its next price read."""
        self.market.model_unknown(provider, model)

    def priors(self) -> RatioPriors:
        """Learned ratios, pooled: built once, kept up to date by each lesson (`_learn`), built
        again when a row or model is new to them or the ledger's rows are reloaded."""
        self._sync_learned()
        if self._priors is None:
            self._priors = RatioPriors(self.learned, self._default_ratio, self.replies, self._default_replies)
        return self._priors

    def outlook(self, shape: RequestShape, providers: list[str]) -> Outlook:
        """The estimator's view of a request: its reply-length forecast and each provider's record."""
        routing = self.config.routing
        records = self.track.outlooks(providers)
        if not routing.rank_by_success_rate:
            records = {name: replace(record, success_rate=1.0) for name, record in records.items()}
        return Outlook(RatioPredictor(self.priors()).forecast(shape), records,
                       routing.risk_aversion, float(routing.failure_penalty))

    def pinning(self, provider_header: str | None, fallback_header: str | None) -> Pinning:
        """The client's X-Arbstr-Provider / X-Arbstr-Fallback, checked against the configured providers."""
        return parse_pinning(provider_header, fallback_header, self.endpoints)

    def decide(self, request_id: str, body: bytes, requested_policy: str | None, app: str | None = None,
               pinning: Pinning = NO_PINNING) -> Decision:
        """Read a chat request and plan its route; ArbstrError when it cannot be served."""
        arrived, started = time.time(), time.monotonic()
        chat = parse_chat_request(body)
        policy = self.policies.select(requested_policy, chat.last_user_text)
        catalogue = self.catalogue  # one snapshot for the whole decision
        providers = [o.provider for o in catalogue.by_model.get(chat.model, ())]
        shape = RequestShape(policy.name, chat.model, chat.input_tokens, chat.max_output_tokens, chat.signals)
        plan = plan_route(RouteRequest(chat.model, chat.input_tokens, pinning), catalogue, policy,
                          self.outlook(shape, providers), self.health.unavailable(chat.model, providers),
                          self.payability(chat.model, providers) if self.payability else None)
        return Decision(request_id, arrived, started, chat, policy, plan, shape, app)

    def _sync_learned(self) -> None:
        if self.ledger is not None and self.ledger.learned_version != self._learned_version:
            self._learned_version = self.ledger.learned_version
            # Rows with the same figures share one RatioStats, as _learn keeps them: it updates
            # such rows once.
            same: dict[tuple[float, float, float, type], RatioStats] = {}
            self.learned = {}
            for key, ratio in self.ledger.learned.items():
                figures = (ratio.mean, ratio.variance, ratio.count, type(ratio.count))
                stats = same.get(figures)
                if stats is None:
                    stats = same[figures] = RatioStats(ratio.mean, ratio.variance, ratio.count)
                self.learned[key] = stats
            self._priors = None

    def sending(self, decision: Decision, provider: str | None = None) -> None:
        """The request is on its way to a provider (`provider` once known): if arbstr stops before
        it settles, it is recorded as interrupted by shutdown (see interrupt_in_flight)."""
        self._in_flight[decision.request_id] = (decision, provider)

    def interrupt_in_flight(self) -> list[RequestRecord]:
        """At shutdown, before connections are cut: settle every request still at a provider as
        interrupted by shutdown (it may have been charged), so none is recorded as the client
        going away or not at all. Later settlements of these requests are ignored."""
        records = []
        for decision, provider in list(self._in_flight.values()):
            record = self.settle(decision, Outcome(provider, None, None, None, time.monotonic(), error=INTERRUPTED))
            self._interrupted[decision.request_id] = record
            records.append(record)
        return records

    def budget(self, decision: Decision) -> RequestBudget:
        """The request's reservations against the budgets it counts toward (none when no budget applies)."""
        return self.budgets.for_request(decision.request_id, decision.plan, decision.app,
                                        decision.chat.max_output_tokens, decision.chat.prompt_token_bound)

    def settle(self, decision: Decision, outcome: Outcome) -> RequestRecord:
        """Work out what the request cost and what it saved, learn from it, and record it."""
        if decision.request_id in self._interrupted:
            return self._interrupted[decision.request_id]
        self._in_flight.pop(decision.request_id, None)
        success = outcome.error is None and outcome.status_code is not None and 200 <= outcome.status_code < 300
        usage = outcome.usage
        estimated_usage = not (usage and usage.has_usage)
        if estimated_usage:
            input_tokens = decision.chat.input_tokens
            output_tokens = estimate_tokens(usage.output_text) if usage else 0
        else:
            input_tokens, output_tokens = usage.input_tokens, usage.output_tokens
        reported = outcome.reported_cost_msats
        if reported is None and usage is not None:
            reported = usage.cost_msats
        checkable = reported is not None
        # What left the wallet, when the payment shows it (X-Cashu: the token minus its change, in
        # whole sats), is the cost; the provider's own figure is what is checked against its prices.
        paid = outcome.paid_msats if outcome.paid_msats is not None else reported
        cost = next_best = most_expensive = chosen_estimate = chosen = None
        cost_reported = False
        if outcome.provider is not None:
            chosen = decision.plan.candidate(outcome.provider)
            chosen_estimate = chosen.estimated_cost
            if success or paid is not None:
                cost, cost_reported = actual_cost(chosen.offer.rates, input_tokens, output_tokens, paid)
            if cost is not None and decision.plan.candidates[-1] is not chosen:
                # Only the candidates after the chosen one could have served instead: those before it
                # were tried and failed. Comparing with them would count failover as a loss.
                order = [c.provider for c in decision.plan.candidates]
                alternatives = list(decision.plan.candidates[order.index(outcome.provider) + 1:])
                prices = {c.provider: estimate_cost(c.offer.rates, input_tokens, output_tokens) for c in alternatives}
                next_best = prices[alternatives[0].provider]
                most_expensive = max(max(prices.values()), cost)
        if outcome.paid_elsewhere_msats:
            # Money attempts before the answer (or instead of one) are known to have cost.
            cost = (cost or 0) + msats_to_sats(outcome.paid_elsewhere_msats)
            cost_reported = cost_reported or outcome.provider is None
        check = None
        if chosen is not None and checkable and not estimated_usage:
            check = check_charge(chosen.offer.billed_rates, input_tokens, output_tokens, reported,
                                 chosen.offer.advertised_fee)
        record = RequestRecord(
            request_id=decision.request_id, timestamp=decision.arrived, policy=decision.policy.name,
            model=decision.chat.model, provider=outcome.provider,
            input_tokens=input_tokens, output_tokens=output_tokens if outcome.provider else None,
            cost_sats=cost, estimated_cost_sats=chosen_estimate, next_best_cost_sats=next_best,
            max_cost_sats=most_expensive, cost_reported=cost_reported,
            latency_ms=round((outcome.finished - decision.started) * 1000, 3),
            ttft_ms=None if outcome.first_byte is None else round((outcome.first_byte - decision.started) * 1000, 3),
            streaming=decision.chat.stream, success=success, status_code=outcome.status_code,
            error=outcome.error, usage_estimated=estimated_usage, attempts=outcome.attempts, app=decision.app,
            charge_diff_msats=None if check is None else check.difference_msats,
        )
        if check is not None:
            self._check_charge(decision, outcome.provider, check)
        if success and not estimated_usage:
            self._learn(decision.shape, input_tokens, output_tokens)
        self._note_provider(outcome, chosen, success, input_tokens)
        if self.ledger:
            self.ledger.record(record)
        self.metrics.observe(record, outcome.failures)
        _log_settled(record, outcome.failures)
        return record

    def _learn(self, shape: RequestShape, input_tokens: int, output_tokens: int) -> None:
        if input_tokens <= 0:
            return
        # Learned here at once for the next request; the database applies the same samples to its
        # own rows, shared by every instance, and the next reload brings theirs in.
        learned = self.learned
        last = updated = None
        rows = learning_rows(shape)
        for key in rows:
            current = learned.get(key)
            # The rows of one policy often hold the same figures (one model: its pair, the policy's
            # pooled row and a shape's variant): the same update gives the same result.
            if current is not last or updated is None:
                last, updated = current, update_ratio(current, input_tokens, output_tokens)
            learned[key] = updated
        if self.ledger:
            for policy, model in learning_keys(shape):
                self.ledger.learn(policy, model, output_tokens / input_tokens)
        replies = self.replies[shape.model] = update_stats(self.replies.get(shape.model), output_tokens)
        # The priors follow what changed; made again when a row or model is new to them.
        if self._priors is not None and not self._priors.learned_again(rows, shape.model, replies):
            self._priors = None

    def _check_charge(self, decision: Decision, provider: str, check: ChargeCheck) -> None:
        """Every reported charge against the prices the plan was made with; overcharges logged
        once per provider per hour."""
        if not self.track.charged(provider, check):
            return
        now = time.monotonic()
        last = self._overcharge_logged.get(provider)
        if last is None or now - last >= OVERCHARGE_LOG_INTERVAL:
            self._overcharge_logged[provider] = now
            totals = self.track.charges(provider)
            standing = self.track.standing(provider)
            event(logging.WARNING, "provider.overcharged",
                  "provider %s charged %d msats, %d msats above its advertised prices (%d of %d checked charges "
                  "over so far; standing: %s); the next overcharge by %s is logged after an hour",
                  provider, check.reported_msats, check.difference_msats, totals.overcharged, totals.checked,
                  standing, provider, request_id=decision.request_id, provider=provider,
                  reported_msats=check.reported_msats, advertised_msats=check.advertised_msats,
                  overcharged=totals.overcharged, checked=totals.checked, standing=standing)

    def _note_provider(self, outcome: Outcome, chosen: Candidate | None, success: bool, input_tokens: int) -> None:
        """What the request showed about each provider it tried: answers, failures, cache reads."""
        for provider, cause in outcome.failures:
            if cause not in NOT_THE_PROVIDERS_DOING:
                self.track.failed(provider, charged=cause in MAY_HAVE_BEEN_BILLED)
        if outcome.provider is None:
            return
        usage = outcome.usage
        if success:
            self.track.answered(outcome.provider)
            if usage is not None and usage.cache_read_tokens is not None and usage.input_tokens:
                self.track.cache_reads(outcome.provider, input_tokens, usage.cache_read_tokens,
                                       usage.cache_read_msats, chosen.offer.rates.input_per_1k)
        elif (outcome.status_code is not None and 200 <= outcome.status_code < 300 and not outcome.client_gone
              and all(provider != outcome.provider for provider, _ in outcome.failures)):
            # A stream that started and broke off: the provider may well have billed it.
            self.track.failed(outcome.provider, charged=True)


MAY_HAVE_BEEN_BILLED = frozenset({EndState.NO_RESPONSE, EndState.PROTOCOL, EndState.HEADER_TIMEOUT,
                                  EndState.BODY_TIMEOUT, EndState.BODY_CUT, EndState.BODY_TOO_LARGE,
                                  EndState.STREAM_IDLE, EndState.STREAM_BROKEN})
"""Failed attempts that reached the provider, which may have billed them (a refusal, an error status
or a 402 costs nothing)."""
NOT_THE_PROVIDERS_DOING = frozenset({EndState.CLIENT_GONE, EndState.CLIENT_ERROR, EndState.LOCAL, EndState.SKIPPED,
                                     EndState.BUDGET})


def _log_settled(record: RequestRecord, failures: tuple[tuple[str, str], ...]) -> None:
    for provider, cause in failures:
        event(logging.INFO, "attempt.failed", "passed over %s: %s", provider, cause,
              request_id=record.request_id, provider=provider, cause=cause)
    level = logging.DEBUG if record.success else logging.WARNING
    if not enabled(level):  # the usual case for every answer: its fields and message are not built
        return
    event(level, "request.settled" if record.success else "request.failed",
          "%s %s via %s: status %s, %s sats, %.1f ms%s", record.policy, record.model, record.provider,
          record.status_code, record.cost_sats, record.latency_ms or 0.0,
          f", error: {record.error}" if record.error else "",
          request_id=record.request_id, provider=record.provider, model=record.model, policy=record.policy,
          status=record.status_code, cost_sats=record.cost_sats, latency_ms=record.latency_ms,
          ttft_ms=record.ttft_ms, error=record.error)

