"""Prometheus metrics of settled requests, read back with prometheus-client's own parser."""

from __future__ import annotations

import json
from decimal import Decimal
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from arbstr.engine import Engine, Outcome
from arbstr.metrics import Metrics
from arbstr.pricing import Rates, check_charge
from arbstr.store import Ledger
from arbstr.usage import UsageReport

from conftest import make_config, provider_toml

PROVIDERS = (provider_toml("a", "https://a.example", ["m"], 1, 2),
             provider_toml("b", "https://b.example", ["m"], 2, 4),
             provider_toml("c", "https://c.example", ["m"], 10, 10, 1))
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 400}]}).encode()


def samples(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    """Every sample of the exposition, by name and labels."""
    text = metrics.exposition()[0].decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


@pytest.fixture
def engine():
    ledger = Ledger(":memory:")
    engine = Engine(make_config(*PROVIDERS), ledger)
    engine.metrics.watch(lambda: engine)
    yield engine
    ledger.close()


def seed(engine: Engine) -> None:
    """Two answers from a (one after b failed), one streamed answer from b, one request nobody served."""
    for reported in (52, 48):
        decision = engine.decide("r", BODY, None)
        engine.settle(decision, Outcome("a", 200, UsageReport(100, 50, reported, "", True), None,
                                        decision.started + 0.2, failures=(("b", "status"),)))
    decision = engine.decide("s", BODY, None)
    engine.settle(decision, Outcome("b", 200, UsageReport(10, 20, None, "", True), None, decision.started + 3,
                                    first_byte=decision.started + 0.04))
    decision = engine.decide("f", BODY, None)
    engine.settle(decision, Outcome(None, 502, None, None, decision.started + 0.01, error="upstream_error",
                                    failures=(("a", "refused"), ("b", "refused"), ("c", "connect_timeout"))))


def test_settled_requests_are_counted_by_provider_model_policy_and_status(engine):
    seed(engine)
    found = samples(engine.metrics)
    labels = {"model": "m", "policy": "default"}
    assert value(found, "arbstr_requests_total", provider="a", status="200", **labels) == 2
    assert value(found, "arbstr_requests_total", provider="b", status="200", **labels) == 1
    assert value(found, "arbstr_requests_total", provider="none", status="502", **labels) == 1


def test_sats_spent_and_saved_in_sats(engine):
    seed(engine)
    found = samples(engine.metrics)
    labels = {"model": "m", "policy": "default"}
    assert value(found, "arbstr_spent_sats_total", provider="a", **labels) == pytest.approx(0.1)
    # b's rates for the same tokens: (100*2 + 50*4)/1000 = 0.4 each; c: (100*10 + 50*10)/1000 + 1 = 2.5
    assert value(found, "arbstr_saved_sats_total", provider="a", versus="next_best", **labels) == pytest.approx(0.7)
    assert value(found, "arbstr_saved_sats_total", provider="a", versus="most_expensive", **labels) == pytest.approx(4.9)
    assert value(found, "arbstr_spent_sats_total", provider="b", **labels) == pytest.approx((10 * 2 + 20 * 4) / 1000)


def test_tokens_failovers_and_their_causes(engine):
    seed(engine)
    found = samples(engine.metrics)
    assert value(found, "arbstr_tokens_total", provider="a", model="m", direction="input") == 200
    assert value(found, "arbstr_tokens_total", provider="a", model="m", direction="output") == 100
    assert value(found, "arbstr_tokens_total", provider="b", model="m", direction="output") == 20
    assert value(found, "arbstr_failovers_total", provider="b", cause="status") == 2
    assert value(found, "arbstr_failovers_total", provider="b", cause="refused") == 1
    assert value(found, "arbstr_failovers_total", provider="c", cause="connect_timeout") == 1


def test_latency_and_time_to_first_token_histograms_in_seconds(engine):
    seed(engine)
    found = samples(engine.metrics)
    assert value(found, "arbstr_request_duration_seconds_count", provider="a") == 2
    assert value(found, "arbstr_request_duration_seconds_sum", provider="a") == pytest.approx(0.4)
    assert value(found, "arbstr_request_duration_seconds_bucket", provider="a", le="0.25") == 2
    assert value(found, "arbstr_request_duration_seconds_bucket", provider="b", le="2.5") == 0
    assert value(found, "arbstr_request_duration_seconds_bucket", provider="b", le="5.0") == 1
    assert value(found, "arbstr_time_to_first_token_seconds_count", provider="b") == 1
    assert value(found, "arbstr_time_to_first_token_seconds_bucket", provider="b", le="0.05") == 1
    assert value(found, "arbstr_time_to_first_token_seconds_count", provider="a") == 0


def test_provider_state_and_ledger_are_read_when_scraped(engine):
    engine.health.record_out_of_funds("b", "402")
    found = samples(engine.metrics)
    assert value(found, "arbstr_provider_state", provider="b", state="out_of_funds") == 1
    assert value(found, "arbstr_provider_state", provider="b", state="up") == 0
    assert value(found, "arbstr_provider_state", provider="a", state="unknown") == 1
    assert value(found, "arbstr_ledger_queue_depth") is not None
    assert value(found, "arbstr_ledger_rows_lost_total") == 0
    assert value(found, "arbstr_ledger_backlog") == 0 and value(found, "arbstr_ledger_failing") == 0


def test_charge_checks_are_read_when_scraped(engine):
    rates = Rates(Decimal(1), Decimal(2))
    engine.track.charged("a", check_charge(rates, 100, 50, 200))
    for _ in range(3):
        engine.track.charged("b", check_charge(rates, 100, 50, 400))
    found = samples(engine.metrics)
    assert value(found, "arbstr_charges_checked_total", provider="a") == 1
    assert value(found, "arbstr_overcharges_total", provider="a") == 0
    assert value(found, "arbstr_charges_checked_total", provider="b") == 3
    assert value(found, "arbstr_overcharges_total", provider="b") == 3
    assert value(found, "arbstr_overcharged_msats_total", provider="b") == 3 * 200
    assert value(found, "arbstr_provider_standing", provider="b", standing="demoted") == 1
    assert value(found, "arbstr_provider_standing", provider="b", standing="ok") == 0
    assert value(found, "arbstr_provider_standing", provider="a", standing="ok") == 1
    assert value(found, "arbstr_charges_checked_total", provider="c") == 0


def test_every_name_has_the_arbstr_prefix_and_counters_end_in_total(engine):
    seed(engine)
    text = engine.metrics.exposition()[0].decode()
    families = list(text_string_to_metric_families(text))
    assert families and all(f.name.startswith("arbstr_") for f in families)
    for family in families:
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples)


def test_promtool_accepts_the_exposition(engine):
    seed(engine)
    # promtool comes with Debian's prometheus package (make test-deps installs it)
    check = subprocess.run(["promtool", "check", "metrics"], input=engine.metrics.exposition()[0],
                           capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
