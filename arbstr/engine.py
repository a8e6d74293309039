"""The routing state of a running arbstr: configuration, policies, offers, what has been learned,
and the ledger every finished request is settled into.

One `Engine` per configuration; a reload builds a new one and swaps it in whole.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from arbstr.chat import ChatRequest, parse_chat_request
from arbstr.config import Config
from arbstr.health import HealthBook
from arbstr.logs import event
from arbstr.metrics import Metrics
from arbstr.market import Market
from arbstr.policy import Policy, PolicyBook
from arbstr.pricing import actual_cost, estimate_cost
from arbstr.router import Catalogue, RoutePlan, RouteRequest, plan_route, update_output_ratio
from arbstr.store import ANY_MODEL, Ledger, RequestRecord
from arbstr.tokens import estimate_tokens
from arbstr.exchange import Deadlines, ProviderEndpoint
from arbstr.usage import UsageReport

if TYPE_CHECKING:
    from arbstr.wallet import Wallet


INTERRUPTED = "interrupted_by_shutdown"
"""The error of a request still at a provider when arbstr stopped."""


@dataclass(frozen=True, slots=True)
class Decision:
    """Everything decided about one request before it is sent."""

    request_id: str
    arrived: float
    """Unix time the request arrived."""
    started: float
    """time.monotonic() when the request arrived, for latencies."""
    chat: ChatRequest
    policy: Policy
    plan: RoutePlan
    app: str | None = None
    """The app the request is attributed to (arbstr.attribution)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a routed request ended, as the addon saw it."""

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


class Engine:
    def __init__(self, config: Config, ledger: Ledger | None = None, metrics: Metrics | None = None,
                 wallet: Wallet | None = None) -> None:
        self.config = config
        self.ledger = ledger
        self.metrics = metrics or Metrics()
        self.wallet = wallet
        """The Cashu wallet ([wallet]); None without one."""
        self.node_balances: dict[str, tuple[float, Any]] = {}
        """What each key's node last said about its balance (GET /v1/balances), with when, by key."""
        self.policies = PolicyBook.from_config(config.policies)
        self.market = Market(config)
        self.endpoints = {
            p.name: ProviderEndpoint(p.name, p.url, p.api_key.get_secret_value() if p.api_key else "")
            for p in config.providers
        }
        self.learned: dict[str, tuple[float, int]] = {}
        """Each policy's output/input ratio (mean, samples), pooled over models: as the ledger last
        loaded it (with what other instances learned), plus what this one learned since."""
        self._learned_version = -1
        self._in_flight: dict[str, tuple[Decision, str | None]] = {}
        """Requests sent to a provider and not settled yet, by request id."""
        self._interrupted: dict[str, RequestRecord] = {}
        self._sync_learned()
        routing = config.routing
        self.deadlines = Deadlines(routing.connect_timeout, routing.header_timeout, routing.body_timeout,
                                   routing.stream_idle_timeout, max_body_bytes=routing.max_response_bytes)
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

    def output_ratio(self, policy: str) -> float:
        """Expected output tokens per input token for a policy: learned, else the configured default."""
        self._sync_learned()
        learned = self.learned.get(policy)
        return learned[0] if learned else self.config.routing.default_output_ratio

    def decide(self, request_id: str, body: bytes, requested_policy: str | None, app: str | None = None) -> Decision:
        """Read a chat request and plan its route; ArbstrError when it cannot be served."""
        arrived, started = time.time(), time.monotonic()
        chat = parse_chat_request(body)
        policy = self.policies.select(requested_policy, chat.last_user_text)
        catalogue = self.market.catalogue
        offers = catalogue.by_model.get(chat.model, ())
        plan = plan_route(
            RouteRequest(chat.model, chat.input_tokens, chat.max_output_tokens),
            catalogue, policy, self.output_ratio(policy.name),
            self.health.unavailable(chat.model, [o.provider for o in offers]),
        )
        return Decision(request_id, arrived, started, chat, policy, plan, app)

    def _sync_learned(self) -> None:
        if self.ledger is not None and self.ledger.learned_version != self._learned_version:
            self._learned_version = self.ledger.learned_version
            self.learned = {policy: (ratio.mean, ratio.count)
                            for (policy, model), ratio in self.ledger.learned.items() if model == ANY_MODEL}

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

    def settle(self, decision: Decision, outcome: Outcome) -> RequestRecord:
        """Work out what the request cost and what it saved, learn from it, and record it."""
        if decision.request_id in self._interrupted:
            return self._interrupted[decision.request_id]
        self._in_flight.pop(decision.request_id, None)
        success = outcome.error is None and outcome.status_code is not None and 200 <= outcome.status_code < 300
        usage = outcome.usage
        estimated_usage = not (usage and usage.has_usage)
        input_tokens = usage.input_tokens if usage and usage.has_usage else decision.chat.input_tokens
        output_tokens = (usage.output_tokens if usage and usage.has_usage
                         else estimate_tokens(usage.output_text) if usage else 0)
        reported = outcome.reported_cost_msats
        if reported is None and usage is not None:
            reported = usage.cost_msats
        cost = next_best = most_expensive = chosen_estimate = None
        cost_reported = False
        if outcome.provider is not None:
            chosen = decision.plan.candidate(outcome.provider)
            chosen_estimate = chosen.estimated_cost
            if success or reported is not None:
                cost, cost_reported = actual_cost(chosen.offer.rates, input_tokens, output_tokens, reported)
            if cost is not None:
                # Only the candidates after the chosen one could have served instead: those before it
                # were tried and failed. Comparing with them would count failover as a loss.
                order = [c.provider for c in decision.plan.candidates]
                alternatives = list(decision.plan.candidates[order.index(outcome.provider) + 1:])
                prices = {c.provider: estimate_cost(c.offer.rates, input_tokens, output_tokens) for c in alternatives}
                if alternatives:
                    next_best = prices[alternatives[0].provider]
                    most_expensive = max(max(prices.values()), cost)
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
        )
        if success and not estimated_usage:
            self._learn(decision.policy.name, decision.chat.model, input_tokens, output_tokens)
        if self.ledger:
            self.ledger.record(record)
        self.metrics.observe(record, outcome.failures)
        _log_settled(record, outcome.failures)
        return record

    def _learn(self, policy: str, model: str, input_tokens: int, output_tokens: int) -> None:
        if input_tokens <= 0:
            return
        # Learned here at once for the next request; the database applies the same sample to its
        # own row, shared by every instance, and the next reload brings theirs in.
        self.learned[policy] = update_output_ratio(self.learned.get(policy), input_tokens, output_tokens)
        if self.ledger:
            self.ledger.learn(policy, model, output_tokens / input_tokens)


def _log_settled(record: RequestRecord, failures: tuple[tuple[str, str], ...]) -> None:
    for provider, cause in failures:
        event(logging.INFO, "attempt.failed", "passed over %s: %s", provider, cause,
              request_id=record.request_id, provider=provider, cause=cause)
    event(logging.DEBUG if record.success else logging.WARNING,
          "request.settled" if record.success else "request.failed",
          "%s %s via %s: status %s, %s sats, %.1f ms%s", record.policy, record.model, record.provider,
          record.status_code, record.cost_sats, record.latency_ms or 0.0,
          f", error: {record.error}" if record.error else "",
          request_id=record.request_id, provider=record.provider, model=record.model, policy=record.policy,
          status=record.status_code, cost_sats=record.cost_sats, latency_ms=record.latency_ms,
          ttft_ms=record.ttft_ms, error=record.error)

