"""Prometheus metrics: what arbstr routed, spent and saved, for a monitoring system to scrape.

One `Metrics` per running arbstr (it outlives config reloads, so counters never go back). The
engine calls `observe` once per settled request: its label set's totals are looked up once and
kept, so a request costs a dict lookup and a few float additions. What is a state
rather than an event (provider health, charge checks, the ledger's queue) is read when scraped, by `StateCollector`.
The text exposition is prometheus-client's own, from metric families built when scraped.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
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


class _Histogram:
    """One label set's histogram, kept as prometheus-client keeps it: a count per bucket and the sum."""

    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets = [0.0] * len(LATENCY_BUCKETS)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # The first bucket whose bound is not below the amount, as prometheus-client's scan finds it.
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, amount)] += 1.0
        self.sum += amount

    def cumulative(self) -> list[tuple[str, float]]:
        return [(floatToGoString(bound), count) for bound, count in zip(LATENCY_BUCKETS, itertools.accumulate(self.buckets))]


class _Sums:
    """Running totals shared by every status of the same labels (sats by policy, tokens by model)."""

    __slots__ = ("first", "second")

    def __init__(self) -> None:
        self.first = self.second = 0.0


class _Figures:
    """Where one (provider, model, policy, status)'s requests are added up."""

    __slots__ = ("requests", "spent", "saved", "tokens", "latency", "ttft")

    def __init__(self, spent: list[float], saved: _Sums, tokens: _Sums, latency: _Histogram, ttft: _Histogram) -> None:
        self.requests = 0.0
        self.spent, self.saved, self.tokens, self.latency, self.ttft = spent, saved, tokens, latency, ttft


class Metrics:
    """The counters and histograms arbstr keeps, in a registry of their own.

    A settled request adds to plain floats (in the order prometheus-client's own counters would, so
    the same sums); `RequestCollector` turns them into metric families when scraped. prometheus-client's
    labelled counters take a lock and a method call per increment, eight of them for every request."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._figures: dict[tuple[str, str, str, str], _Figures] = {}
        self._spent: dict[tuple[str, str, str], list[float]] = {}
        self._saved: dict[tuple[str, str, str], _Sums] = {}
        """next_best (first) and most_expensive (second)."""
        self._tokens: dict[tuple[str, str], _Sums] = {}
        """input (first) and output (second)."""
        self._latency: dict[str, _Histogram] = {}
        self._ttft: dict[str, _Histogram] = {}
        self._failovers: dict[tuple[str, str], float] = {}
        self.registry.register(RequestCollector(self))

    def observe(self, record: RequestRecord, failures: Sequence[tuple[str, str]] = ()) -> None:
        """Count one settled request, and the failed attempts passed over before it."""
        provider = record.provider or NO_PROVIDER
        key = (provider, record.model, record.policy, str(record.status_code or NO_PROVIDER))
        figures = self._figures.get(key)
        if figures is None:
            figures = self._figures[key] = self._add(*key)
        figures.requests += 1.0
        cost = record.cost_sats
        if cost is not None and record.success:
            figures.spent[0] += float(cost)
            if record.next_best_cost_sats is not None:
                figures.saved.first += max(0.0, float(record.next_best_cost_sats - cost))
            if record.max_cost_sats is not None:
                figures.saved.second += max(0.0, float(record.max_cost_sats - cost))
        if record.input_tokens and record.provider:
            figures.tokens.first += record.input_tokens
        if record.output_tokens:
            figures.tokens.second += record.output_tokens
        if record.latency_ms is not None:
            figures.latency.observe(record.latency_ms / 1000)
        if record.ttft_ms is not None:
            figures.ttft.observe(record.ttft_ms / 1000)
        for cause in failures:
            self._failovers[cause] = self._failovers.get(cause, 0.0) + 1.0

    def _add(self, provider: str, model: str, policy: str, status: str) -> _Figures:
        """A new label set's place, sharing the totals its other labels already have."""
        return _Figures(self._spent.setdefault((provider, model, policy), [0.0]),
                        self._saved.setdefault((provider, model, policy), _Sums()),
                        self._tokens.setdefault((provider, model), _Sums()),
                        self._latency.setdefault(provider, _Histogram()), self._ttft.setdefault(provider, _Histogram()))

    def watch(self, engine: Callable[[], Engine | None]) -> None:
        """Report the current engine's provider states and ledger when scraped."""
        self.registry.register(StateCollector(engine))

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestCollector(Collector):
    """The settled requests' counters and histograms, as metric families, in the order and with the
    names, help and labels they have always been exposed with."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        metrics = self._metrics
        request_labels = ("provider", "model", "policy")
        requests = CounterMetricFamily("arbstr_requests", "Requests settled, by provider, model, policy and HTTP status "
                                       "(status 'none' when no answer came).", labels=(*request_labels, "status"))
        spent = CounterMetricFamily("arbstr_spent_sats", "Sats paid to providers.", labels=request_labels)
        saved = CounterMetricFamily("arbstr_saved_sats", "Sats saved by routing, against the next-best candidate of "
                                    "the plan (versus=next_best) and the most expensive eligible provider "
                                    "(versus=most_expensive).", labels=(*request_labels, "versus"))
        tokens = CounterMetricFamily("arbstr_tokens", "Tokens sent (direction=input) and received (direction=output).",
                                     labels=("provider", "model", "direction"))
        failovers = CounterMetricFamily("arbstr_failovers", "Attempts that failed and were passed over, by provider "
                                        "and cause.", labels=("provider", "cause"))
        latency = HistogramMetricFamily("arbstr_request_duration_seconds", "Time from a request's arrival to the end "
                                        "of its answer.", labels=("provider",))
        ttft = HistogramMetricFamily("arbstr_time_to_first_token_seconds", "Time from a streamed request's arrival "
                                     "to its first body byte.", labels=("provider",))
        # Each label set in the order it first appeared, as prometheus-client lists its children.
        for labels, figures in metrics._figures.items():
            requests.add_metric(labels, figures.requests)
        for labels, total in metrics._spent.items():
            spent.add_metric(labels, total[0])
        for labels, sums in metrics._saved.items():
            saved.add_metric((*labels, "next_best"), sums.first)
            saved.add_metric((*labels, "most_expensive"), sums.second)
        for labels, sums in metrics._tokens.items():
            tokens.add_metric((*labels, "input"), sums.first)
            tokens.add_metric((*labels, "output"), sums.second)
        for (provider, cause), count in metrics._failovers.items():
            failovers.add_metric((provider, cause), count)
        for family, histograms in ((latency, metrics._latency), (ttft, metrics._ttft)):
            for provider, histogram in histograms.items():
                family.add_metric((provider,), histogram.cumulative(), histogram.sum)
        yield from (requests, spent, saved, tokens, failovers, latency, ttft)


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
