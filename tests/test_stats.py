"""Stats and request pages against a fixture whose figures are worked out by hand."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from arbstr.errors import InvalidRequest
from arbstr.stats import (compute_stats, list_requests, parse_bucket, parse_group, parse_page, parse_window,
                          percentile)
from arbstr.store import Ledger

from test_store import ROW

NOW = 1_790_000_000.0
HOUR = 3600.0

FIXTURE = [
    # alpha: two successes, 2 hours and 2 days ago
    replace(ROW, request_id="a1", timestamp=NOW - 2 * HOUR, provider="alpha", model="gpt-4o", policy="default",
            input_tokens=100, output_tokens=50, cost_sats=Decimal("0.052"), next_best_cost_sats=Decimal("0.1"),
            max_cost_sats=Decimal("0.3"), latency_ms=10.0, charge_diff_msats=0),
    replace(ROW, request_id="a2", timestamp=NOW - 48 * HOUR, provider="alpha", model="gpt-4o", policy="code",
            input_tokens=10, output_tokens=20, cost_sats=Decimal("1.5"), next_best_cost_sats=Decimal("2"),
            max_cost_sats=Decimal("3.25"), latency_ms=30.0, streaming=True, ttft_ms=5.0, charge_diff_msats=700),
    # beta: a success with no alternative, and a streamed one with estimated usage 30 minutes ago
    replace(ROW, request_id="b1", timestamp=NOW - 30 * 60, provider="beta", model="llama3:8b", policy="default",
            input_tokens=7, output_tokens=3, cost_sats=Decimal("0.000001"), next_best_cost_sats=None,
            max_cost_sats=None, latency_ms=20.0, usage_estimated=True, streaming=True),
    # a failure: no provider answered
    replace(ROW, request_id="f1", timestamp=NOW - 10 * 60, provider=None, model="gpt-4o", policy="default",
            input_tokens=40, output_tokens=None, cost_sats=None, next_best_cost_sats=None, max_cost_sats=None,
            latency_ms=500.0, success=False, status_code=502, error="upstream_error"),
]


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    ledger = Ledger(str(tmp_path_factory.mktemp("stats") / "s.db"))
    for record in FIXTURE:
        ledger.record(record)
    yield ledger
    ledger.close()


def stats(ledger, params=None, group=None):
    window = parse_window(params or {}, NOW)
    return ledger.call(lambda: compute_stats(window, group))


class TestTotals:
    def test_all_time(self, ledger):
        totals = stats(ledger)["totals"]
        assert totals == {
            "requests": 4, "successes": 3, "errors": 1, "streaming": 2, "usage_estimated": 1,
            "input_tokens": 157, "output_tokens": 73,
            "cost_sats": "1.552001",                      # 0.052 + 1.5 + 0.000001
            "saved_vs_next_best_sats": "0.548",           # (0.1-0.052) + (2-1.5)
            "saved_vs_most_expensive_sats": "1.998",      # (0.3-0.052) + (3.25-1.5)
            "latency_ms": {"p50": 20.0, "p95": 30.0, "p99": 30.0},  # successes only
            "ttft_ms": {"p50": 5.0, "p95": 5.0},          # a2 alone was timed to its first byte
            "estimate_vs_actual": {"requests": 3, "estimated_sats": "0.15753", "actual_sats": "1.552001"},
            "charges": {"checked": 2, "overcharged": 1, "overcharged_msats": 700},  # a2 was billed 700 over
        }

    def test_range_24h_leaves_out_the_old_row(self, ledger):
        totals = stats(ledger, {"range": "24h"})["totals"]
        assert (totals["requests"], totals["cost_sats"], totals["saved_vs_next_best_sats"]) == (3, "0.052001", "0.048")

    def test_range_1h(self, ledger):
        assert stats(ledger, {"range": "1h"})["totals"]["requests"] == 2

    def test_since_and_until(self, ledger):
        window = {"since": "2026-09-19T00:00:00Z", "until": "2026-09-21T12:00:00+00:00"}
        assert parse_window(window, NOW).since < FIXTURE[1].timestamp < parse_window(window, NOW).until
        assert stats(ledger, window)["totals"]["requests"] == 1

    def test_filters(self, ledger):
        assert stats(ledger, {"provider": "alpha"})["totals"]["cost_sats"] == "1.552"
        assert stats(ledger, {"model": "gpt-4o", "policy": "default"})["totals"]["requests"] == 2


class TestGroups:
    def test_by_provider(self, ledger):
        result = stats(ledger, group="provider")
        groups = {g["provider"]: g for g in result["groups"]}
        assert set(groups) == {"", "alpha", "beta"}
        assert groups["alpha"]["cost_sats"] == "1.552" and groups["alpha"]["requests"] == 2
        assert groups["beta"]["saved_vs_next_best_sats"] == "0"
        assert groups[""]["errors"] == 1
        assert groups["alpha"]["charges"] == {"checked": 2, "overcharged": 1, "overcharged_msats": 700}
        assert groups["beta"]["charges"] == {"checked": 0, "overcharged": 0, "overcharged_msats": 0}

    def test_by_policy(self, ledger):
        groups = {g["policy"]: g["requests"] for g in stats(ledger, group="policy")["groups"]}
        assert groups == {"code": 1, "default": 3}


class TestRequests:
    def test_newest_first_paginated(self, ledger):
        window = parse_window({}, NOW)
        page = ledger.call(lambda: list_requests(window, limit=2, offset=1))
        assert [r["request_id"] for r in page["data"]] == ["b1", "a1"]
        assert page["total"] == 4
        assert page["data"][1]["cost_sats"] == "0.052"
        assert page["data"][0]["timestamp"].endswith("Z")


class TestParameters:
    @pytest.mark.parametrize("params", [
        {"range": "2d"}, {"since": "yesterday"}, {"until": "2026-13-01"},
        {"since": "2026-11-23T10:00:00Z", "until": "2026-11-23T09:00:00Z"},
    ])
    def test_bad_window(self, params):
        with pytest.raises(InvalidRequest) as err:
            parse_window(params, NOW)
        assert err.value.status == 400

    def test_bad_group_and_page(self):
        with pytest.raises(InvalidRequest):
            parse_group({"group_by": "color"})
        for params in ({"limit": "0"}, {"limit": "501"}, {"limit": "x"}, {"offset": "-1"}):
            with pytest.raises(InvalidRequest):
                parse_page(params)
        assert parse_page({}) == (50, 0)

    def test_percentile_nearest_rank(self):
        values = sorted(float(v) for v in range(1, 101))
        assert (percentile(values, 0.5), percentile(values, 0.95), percentile(values, 0.99)) == (50.0, 95.0, 99.0)
        assert percentile([], 0.5) is None


class TestTimeSeries:
    def series(self, ledger, params, bucket):
        window = parse_window(params, NOW)
        return ledger.call(lambda: compute_stats(window, None, bucket, NOW))["series"]

    def test_hourly_buckets_over_24h_hold_each_row_once(self, ledger):
        series = self.series(ledger, {"range": "24h"}, "1h")
        assert series["bucket_seconds"] == 3600 and len(series["start"]) == 25
        assert series["start"][0] == (NOW - 24 * HOUR) // 3600 * 3600
        assert all(b - a == 3600 for a, b in zip(series["start"], series["start"][1:]))
        assert sum(series["requests"]) == 3 and sum(series["errors"]) == 1
        index = {name: int((NOW - age - series["start"][0]) // 3600) for name, age in
                 (("a1", 2 * HOUR), ("b1", 30 * 60), ("f1", 10 * 60))}
        assert series["cost_sats"][index["a1"]] == "0.052"
        assert series["cost_sats_by_provider"]["alpha"][index["a1"]] == "0.052"
        assert series["cost_sats_by_provider"]["beta"][index["b1"]] == "0.000001"
        assert series["errors"][index["f1"]] == 1
        assert series["saved_vs_next_best_sats"][index["a1"]] == "0.048"
        assert series["saved_vs_most_expensive_sats"][index["a1"]] == "0.248"
        assert set(series["cost_sats_by_provider"]) == {"alpha", "beta"}

    def test_all_time_starts_at_the_first_row(self, ledger):
        series = self.series(ledger, {}, "1d")
        assert series["start"][0] == (NOW - 48 * HOUR) // 86400 * 86400
        assert sum(series["requests"]) == 4
        assert sum(Decimal(v) for v in series["cost_sats"]) == Decimal("1.552001")

    def test_filters_apply_to_the_series(self, ledger):
        series = self.series(ledger, {"range": "7d", "provider": "beta"}, "6h")
        assert sum(series["requests"]) == 1 and list(series["cost_sats_by_provider"]) == ["beta"]

    def test_too_many_points_is_a_400(self, ledger):
        with pytest.raises(InvalidRequest, match="at most 2000"):
            self.series(ledger, {"range": "30d"}, "1m")

    def test_an_unknown_bucket_is_named(self):
        with pytest.raises(InvalidRequest, match="bucket must be one of 1m, 5m, 15m, 1h, 6h, 1d, not '2h'"):
            parse_bucket({"bucket": "2h"})
