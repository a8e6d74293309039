"""Prometheus metrics: what arbstr routed, spent and saved, for a monitoring system to scrape.

One `Metrics` per running arbstr (it outlives config reloads, so counters never go back). The
engine calls `observe` once per settled request: the label children of a request's labels are
looked up once and kept, so a request costs a dict lookup and a few increments. What is a state
rather than an event (provider health, charge checks, the ledger's queue) is read when scraped, by `StateCollector`.
The text exposition is prometheus-client's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from arbstr.estimator import STANDINGS

if TYPE_CHECKING:
    from arbstr.engine import Engine
    from arbstr.store import RequestRecord

# A `_created` timestamp beside every counter doubles the exposition and tells a scraper nothing
# it needs; prometheus-client's switch for it is process-wide.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, float("inf"))
PROVIDER_STATES = ("up", "unknown", "degraded", "open", "half_open", "out_of_funds")
NO_PROVIDER = "none"
"""The provider label of a request no provider answered."""


class Metrics:
    """The counters and histograms arbstr keeps, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        request_labels = ("provider", "model", "policy")
        self.requests = Counter("arbstr_requests", "Requests settled, by provider, model, policy and HTTP status "
                                "(status 'none' when no answer came).", (*request_labels, "status"), registry=registry)
        self.spent = Counter("arbstr_spent_sats", "Sats paid to providers.", request_labels, registry=registry)
        self.saved = Counter("arbstr_saved_sats", "Sats saved by routing, against the next-best candidate of the "
                             "plan (versus=next_best) and the most expensive eligible provider (versus=most_expensive).",
                             (*request_labels, "versus"), registry=registry)
        self.tokens = Counter("arbstr_tokens", "Tokens sent (direction=input) and received (direction=output).",
                              ("provider", "model", "direction"), registry=registry)
        self.failovers = Counter("arbstr_failovers", "Attempts that failed and were passed over, by provider and cause.",
                                 ("provider", "cause"), registry=registry)
        self.latency = Histogram("arbstr_request_duration_seconds", "Time from a request's arrival to the end of its answer.",
                                 ("provider",), buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("arbstr_time_to_first_token_seconds", "Time from a streamed request's arrival to its "
                              "first body byte.", ("provider",), buckets=LATENCY_BUCKETS, registry=registry)
        self._children: dict[tuple[str, str, str, str], tuple[Any, ...]] = {}

    def observe(self, record: RequestRecord, failures: Sequence[tuple[str, str]] = ()) -> None:
        """Count one settled request, and the failed attempts passed over before it."""
        provider = record.provider or NO_PROVIDER
        key = (provider, record.model, record.policy, str(record.status_code or NO_PROVIDER))
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = self._make_children(*key)
        requests, spent, saved_next, saved_max, tokens_in, tokens_out, latency, ttft = children
        requests.inc()
        cost = record.cost_sats
        if cost is not None and record.success:
            spent.inc(float(cost))
            if record.next_best_cost_sats is not None:
                saved_next.inc(max(0.0, float(record.next_best_cost_sats - cost)))
            if record.max_cost_sats is not None:
                saved_max.inc(max(0.0, float(record.max_cost_sats - cost)))
        if record.input_tokens and record.provider:
            tokens_in.inc(record.input_tokens)
        if record.output_tokens:
            tokens_out.inc(record.output_tokens)
        if record.latency_ms is not None:
            latency.observe(record.latency_ms / 1000)
        if record.ttft_ms is not None:
            ttft.observe(record.ttft_ms / 1000)
        for failed_provider, cause in failures:
            self.failovers.labels(failed_provider, cause).inc()

    def _make_children(self, provider: str, model: str, policy: str, status: str) -> tuple[Any, ...]:
        return (self.requests.labels(provider, model, policy, status),
                self.spent.labels(provider, model, policy),
                self.saved.labels(provider, model, policy, "next_best"),
                self.saved.labels(provider, model, policy, "most_expensive"),
                self.tokens.labels(provider, model, "input"), self.tokens.labels(provider, model, "output"),
                self.latency.labels(provider), self.ttft.labels(provider))

    def watch(self, engine: Callable[[], Engine | None]) -> None:
        """Report the current engine's provider states and ledger when scraped."""
        self.registry.register(StateCollector(engine))

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class StateCollector(Collector):
    """Provider states and the ledger's queue, read at scrape time from whichever engine is current."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self._engine = engine

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        engine = self._engine()
        if engine is None:
            return
        state = GaugeMetricFamily("arbstr_provider_state", "1 for each provider's current state (as GET /health "
                                  "reports it), 0 for the others.", labels=("provider", "state"))
        for name in engine.health.providers:
            current = engine.health.state(name)
            for candidate in PROVIDER_STATES:
                state.add_metric((name, candidate), 1.0 if candidate == current else 0.0)
        yield state
        yield from _charge_checks(engine)
        yield from _money(engine.money)
        if engine.ledger is not None:
            depth = GaugeMetricFamily("arbstr_ledger_queue_depth", "Rows and reads waiting for the ledger's writer.")
            depth.add_metric((), engine.ledger.queue_depth())
            yield depth
            health = engine.ledger.health()
            lost = CounterMetricFamily("arbstr_ledger_rows_lost", "Request rows given up for good: the database "
                                       "failed and the buffer and spill file were full (should stay 0).")
            lost.add_metric((), health.rows_lost)
            yield lost
            backlog = GaugeMetricFamily("arbstr_ledger_backlog", "Rows kept for a retry while the database fails.")
            backlog.add_metric((), health.backlog)
            yield backlog
            failing = GaugeMetricFamily("arbstr_ledger_failing", "1 while the ledger cannot write, else 0.")
            failing.add_metric((), 1.0 if health.state == "failing" else 0.0)
            yield failing


def _charge_checks(engine: Engine) -> Iterable[Metric]:
    """Each provider's reported charges checked against its advertised prices since start (the
    figures /health shows), and whether that set it aside."""
    checked = CounterMetricFamily("arbstr_charges_checked", "Reported charges checked against the provider's "
                                  "advertised prices.", labels=("provider",))
    over = CounterMetricFamily("arbstr_overcharges", "Checked charges above the advertised prices by more than "
                               "rounding.", labels=("provider",))
    over_msats = CounterMetricFamily("arbstr_overcharged_msats", "What overcharged requests were billed above "
                                     "the advertised prices, in msats.", labels=("provider",))
    standing = GaugeMetricFamily("arbstr_provider_standing", "1 for each provider's standing on its charges "
                                 "(ok, overcharging, demoted, excluded), 0 for the others.",
                                 labels=("provider", "standing"))
    for name in engine.health.providers:
        totals = engine.track.charges(name)
        checked.add_metric((name,), totals.checked)
        over.add_metric((name,), totals.overcharged)
        over_msats.add_metric((name,), totals.overcharged_msats)
        current = engine.track.standing(name)
        for candidate in STANDINGS:
            standing.add_metric((name, candidate), 1.0 if candidate == current else 0.0)
    yield from (checked, over, over_msats, standing)


WALLET_STATES = (("spendable", "spendable_sats"), ("in_tokens_out", "in_tokens_out_sats"),
                 ("incoming", "incoming_sats"))


def _money(money: dict[str, Any]) -> Iterable[Metric]:
    """The wallet's sats per mint and what each provider's keys hold, as /metrics read them just now."""
    wallet = money.get("wallet")
    if wallet and "mints" in wallet:
        sats = GaugeMetricFamily("arbstr_wallet_sats", "Sats in arbstr's Cashu wallet by mint and state: spendable, "
                                 "in_tokens_out (handed to a node, its fate not known yet) and incoming (received, "
                                 "not yet swapped into proofs of its own).", labels=("mint", "state"))
        for mint in wallet["mints"]:
            for state, field in WALLET_STATES:
                sats.add_metric((mint["url"], state), float(mint[field]))
        yield sats
    held = GaugeMetricFamily("arbstr_key_balance_sats", "What the keys arbstr pays a provider with hold, as its node "
                             "last said (Routstr's /v1/balance/info, asked at most every 30 s).", labels=("provider",))
    reserved = GaugeMetricFamily("arbstr_key_reserved_sats", "What a provider's node holds reserved on those keys for "
                                 "requests still running.", labels=("provider",))
    for provider in money.get("providers", ()):
        if provider["balance_sats"] is not None:
            held.add_metric((provider["name"],), float(provider["balance_sats"]))
            reserved.add_metric((provider["name"],), float(provider["reserved_sats"]))
    yield held
    yield reserved
