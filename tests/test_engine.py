"""Settling requests: exact cost, savings against the alternatives, learning the output ratio."""

from __future__ import annotations

import json
import random
import time
from dataclasses import astuple
from decimal import Decimal

import pytest

from arbstr.engine import INTERRUPTED, Engine, Outcome
from arbstr.estimator import (ANY_MODEL, PRIOR_WEIGHT, RELIABILITY_HALF_LIFE, RatioPriors, RatioStats, learned_rows,
                              learning_keys, update_ratio)
from arbstr.store import Ledger, RequestRow
from arbstr.usage import UsageReport

from conftest import make_config, provider_toml

PROVIDERS = (provider_toml("a", "https://a.example", ["m"], 1, 2),       # cheapest
             provider_toml("b", "https://b.example", ["m"], 2, 4),
             provider_toml("c", "https://c.example", ["m"], 10, 10, 1))  # most expensive


def body(text: str = "x" * 400, **fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": text}], **fields}).encode()


@pytest.fixture
def engine():
    ledger = Ledger(":memory:")
    yield Engine(make_config(*PROVIDERS), ledger)
    ledger.close()


def settle(engine: Engine, usage: UsageReport | None, reported: int | None = None, provider: str = "a",
           status: int = 200, error: str | None = None, stream: bool = False, paid_msats: int | None = None):
    decision = engine.decide("rid", body(stream=stream), None)
    return decision, engine.settle(decision, Outcome(provider, status, usage, reported, decision.started + 0.25,
                                                     error=error, attempts="none", paid_msats=paid_msats))


class TestCost:
    def test_reported_cost_wins_and_savings_use_the_same_tokens(self, engine):
        _, record = settle(engine, UsageReport(100, 50, 52, "", True))
        assert record.cost_sats == Decimal("0.052") and record.cost_reported
        assert record.next_best_cost_sats == Decimal("0.4")         # b: (100*2 + 50*4)/1000
        assert record.max_cost_sats == Decimal("2.5")               # c: (100*10 + 50*10)/1000 + 1
        assert (record.input_tokens, record.output_tokens, record.usage_estimated) == (100, 50, False)
        assert record.latency_ms == 250.0

    def test_cost_from_rates_when_the_provider_reports_none(self, engine):
        _, record = settle(engine, UsageReport(100, 50, None, "", True))
        assert record.cost_sats == Decimal("0.2") and not record.cost_reported

    def test_header_cost_counts_when_the_body_has_none(self, engine):
        _, record = settle(engine, UsageReport(100, 50, None, "", True), reported=70)
        assert record.cost_sats == Decimal("0.07")

    def test_an_answer_cut_after_its_xcashu_change_costs_what_the_change_shows(self, engine):
        # routstr-core: the change header came, the body broke off; the token minus the change is
        # what left the wallet, and there is no provider report to check against its prices.
        _, record = settle(engine, None, status=200, error="body_cut: the body was cut short", paid_msats=3000)
        assert record.cost_sats == Decimal(3) and record.cost_reported and not record.success
        assert record.charge_diff_msats is None and engine.track.charges("a").checked == 0

    def test_money_failed_attempts_are_known_to_have_taken_is_part_of_the_cost(self, engine):
        decision = engine.decide("rid", body(), None)
        answered = engine.settle(decision, Outcome("b", 200, UsageReport(100, 50, 52, "", True), None,
                                                   decision.started + 0.25, paid_elsewhere_msats=2000))
        assert answered.cost_sats == Decimal("2.052") and answered.provider == "b"
        decision = engine.decide("rid2", body(), None)
        none_answered = engine.settle(decision, Outcome(None, 502, None, None, decision.started + 0.25,
                                                        error="all_providers_failed", paid_elsewhere_msats=3000))
        assert none_answered.cost_sats == Decimal(3) and none_answered.cost_reported

    def test_an_xcashu_answer_costs_what_left_the_wallet_and_the_providers_report_is_checked(self, engine):
        # The node keeps the change's rounding to whole sats: 52 msats billed cost a whole sat.
        _, record = settle(engine, UsageReport(100, 50, 52, "", True), paid_msats=1000)
        assert record.cost_sats == Decimal(1) and record.cost_reported
        assert record.charge_diff_msats == 52 - 200  # the report, against a's advertised 0.2 sats
        assert engine.track.charges("a").checked == 1 and engine.track.charges("a").overcharged == 0

    def test_missing_usage_is_estimated_and_marked_never_zero(self, engine):
        decision, record = settle(engine, UsageReport(None, None, None, "a" * 40, False))
        assert record.usage_estimated
        assert record.input_tokens == decision.chat.input_tokens > 0
        assert record.output_tokens == 10
        assert record.cost_sats == (Decimal(decision.chat.input_tokens) * 1 + 10 * 2) / 1000

    def test_failure_without_provider_costs_nothing_and_keeps_the_estimate_off(self, engine):
        _, record = settle(engine, None, provider=None, status=502, error="upstream_error")
        assert record.cost_sats is None and not record.success and record.error == "upstream_error"

    def test_after_failover_only_the_candidates_that_could_have_served_count(self, engine):
        # a failed first, b served: a could not have served, so it is no saving foregone (nor a loss).
        _, record = settle(engine, UsageReport(100, 50, None, "", True), provider="b")
        assert record.cost_sats == Decimal("0.4")
        assert record.next_best_cost_sats == Decimal("2.5") == record.max_cost_sats  # c, the only one left
        _, last = settle(engine, UsageReport(100, 50, None, "", True), provider="c")
        assert last.next_best_cost_sats is None and last.max_cost_sats is None

    def test_savings_are_never_negative_whichever_candidate_served(self, engine):
        for provider in ("a", "b", "c"):
            _, record = settle(engine, UsageReport(100, 50, None, "", True), provider=provider)
            for other in (record.next_best_cost_sats, record.max_cost_sats):
                assert other is None or other >= record.cost_sats

    def test_rows_reach_the_ledger(self, engine):
        settle(engine, UsageReport(100, 50, 52, "", True))
        saved = engine.ledger.call(lambda: [(r.request_id, r.cost_nsats) for r in RequestRow.select()])
        assert saved == [("rid", 52_000_000)]


class TestShutdown:
    def test_requests_still_at_a_provider_are_recorded_as_interrupted_once(self, engine):
        waiting = engine.decide("at-provider", body(), None)
        engine.sending(waiting)
        engine.sending(waiting, "b")
        done = engine.decide("done", body(), None)
        engine.sending(done, "a")
        engine.settle(done, Outcome("a", 200, UsageReport(100, 50, 52, "", True), None, done.started))
        [record] = engine.interrupt_in_flight()
        assert (record.request_id, record.provider, record.error, record.success) == (
            "at-provider", "b", INTERRUPTED, False)
        # The stream cut by the shutdown that follows settles again: the interruption stays the record.
        late = engine.settle(waiting, Outcome("b", 200, None, None, waiting.started, error="client went away"))
        assert late is record
        saved = engine.ledger.call(lambda: sorted((r.request_id, r.error) for r in RequestRow.select()))
        assert saved == [("at-provider", INTERRUPTED), ("done", None)]


class TestLearning:
    def test_ratio_is_learned_per_policy_and_model_from_true_usage_only(self, engine):
        assert engine.priors().ratio("default", "m").mean == 1.0
        settle(engine, UsageReport(None, None, None, "abc", False))
        assert engine.learned == {}
        settle(engine, UsageReport(100, 50, None, "", True))
        assert engine.learned[("default", "m")] == RatioStats(0.5, 0.0, 1)
        settle(engine, UsageReport(100, 150, None, "", True))
        assert engine.learned[("default", "m")] == engine.learned[("default", ANY_MODEL)] == RatioStats(1.0, 0.25, 2)
        settle(engine, UsageReport(100, 100, None, "", True), status=500, error="provider answered 500")
        assert engine.learned[("default", "m")].count == 2

    def test_request_signals_are_learned_apart(self, engine):
        decision = engine.decide("r", body(response_format={"type": "json_object"}), None)
        engine.settle(decision, Outcome("a", 200, UsageReport(100, 10, None, "", True), None, decision.started))
        # the shape's ratio has no row pooled over models: its prior is the pair
        assert set(engine.learned) == {("default", "m"), ("default", ANY_MODEL), ("default[json]", "m")}

    def test_learned_ratio_survives_a_restart(self, tmp_path):
        path = str(tmp_path / "l.db")
        ledger = Ledger(path)
        first = Engine(make_config(*PROVIDERS), ledger)
        settle(first, UsageReport(100, 300, None, "", True))
        ledger.close()
        ledger = Ledger(path)
        again = Engine(make_config(*PROVIDERS), ledger)
        ledger.close()
        assert again.learned[("default", "m")] == again.learned[("default", ANY_MODEL)] == RatioStats(3.0, 0.0, 1)
        # The plain requests' one sample against the pair's (the same), against its policy's (the same
        # again), itself against the default 1.0 (no reply lengths seen since the restart): one
        # sample cannot say how much they differ, so each prior counts for PRIOR_WEIGHT.
        policy = (3.0 + 1.0 * PRIOR_WEIGHT) / (1 + PRIOR_WEIGHT)
        pair = (3.0 + policy * PRIOR_WEIGHT) / (1 + PRIOR_WEIGHT)
        assert again.priors().ratio("default", "m").mean == pytest.approx((3.0 + pair * PRIOR_WEIGHT)
                                                                          / (1 + PRIOR_WEIGHT))

    def test_what_another_instance_learned_arrives_within_the_reload_interval(self, tmp_path):
        path = str(tmp_path / "shared.db")
        mine, theirs = Ledger(path, reload_interval=0.05), Ledger(path, reload_interval=0.05)
        here, there = Engine(make_config(*PROVIDERS), mine), Engine(make_config(*PROVIDERS), theirs)
        settle(there, UsageReport(100, 300, None, "", True))
        settle(here, UsageReport(100, 100, None, "", True))
        deadline = time.monotonic() + 10
        pooled = ("default", ANY_MODEL)

        def count(engine: Engine) -> float:
            engine.priors()  # what a request does: picks up the ledger's latest reload
            return engine.learned[pooled].count if pooled in engine.learned else 0
        while count(here) < 2 or count(there) < 2:
            assert time.monotonic() < deadline, (here.learned, there.learned)
            time.sleep(0.02)
        mine.close(), theirs.close()
        assert here.learned[pooled] == there.learned[pooled]
        assert here.learned[pooled].mean == pytest.approx(2.0)  # (3 + 1) / 2, in either order

    @pytest.mark.parametrize("extra,first", [("", "cheap-in"), ("[routing]\ndefault_output_ratio = 1.0\n", "cheap-out")])
    def test_with_nothing_learned_a_long_input_is_expected_a_typical_reply(self, extra, first):
        # 4,000 input tokens: a reply of default_reply_tokens (256) makes cheap input the better buy;
        # an explicit output/input ratio of 1 expects 4,000 output tokens and goes the other way.
        config = make_config(provider_toml("cheap-in", "https://i.example", ["m"], 1, 20),
                             provider_toml("cheap-out", "https://o.example", ["m"], 10, 2), extra=extra)
        assert Engine(config).decide("r", body("word " * 4000), None).plan.best.provider == first

    def test_routing_changes_once_the_ratio_is_learned(self):
        # in-heavy: cheap input, dear output; out-heavy: the reverse
        config = make_config(provider_toml("cheap-in", "https://i.example", ["m"], 1, 20),
                             provider_toml("cheap-out", "https://o.example", ["m"], 10, 2),
                             extra="[routing]\ndefault_output_ratio = 0.1\n")
        engine = Engine(config)
        assert engine.decide("r", body(), None).plan.best.provider == "cheap-in"
        for _ in range(3):
            decision = engine.decide("r", body(), None)
            engine.settle(decision, Outcome("cheap-in", 200, UsageReport(100, 800, None, "", True),
                                            None, decision.started))
        assert engine.learned[("default", "m")].mean == pytest.approx(8.0)
        assert engine.decide("r", body(), None).plan.best.provider == "cheap-out"


class TestLearningShortcut:
    """_learn updates rows that hold the same figures once (they share one RatioStats): the rows
    must come out as each row updated on its own would, whatever mix of policies, models and
    shapes answers, and after a reload from the ledger."""

    CONFIG = (provider_toml("a", "https://a.example", ["m", "n"], 1, 2),)
    POLICIES = '[[policies.rules]]\nname = "code"\nkeywords = ["code"]\n'

    @staticmethod
    def plainly(learned: dict, decision, input_tokens: int, output_tokens: int) -> None:
        for policy, model in learning_keys(decision.shape):
            for key in learned_rows(policy, model):
                learned[key] = update_ratio(learned.get(key), input_tokens, output_tokens)

    @pytest.mark.parametrize("seed", [1, 2])
    def test_rows_are_those_updated_one_by_one(self, tmp_path, seed):
        rng = random.Random(seed)
        ledger = Ledger(str(tmp_path / "l.db"), reload_interval=0)
        engine = Engine(make_config(*self.CONFIG, extra=self.POLICIES), ledger)
        expected: dict = {}
        for i in range(400):
            fields = rng.choice([{}, {}, {"response_format": {"type": "json_object"}}, {"tools": [{"x": 1}]}])
            text = rng.choice(["write code", "hello there"]) + " x" * rng.randint(1, 50)
            decision = engine.decide(str(i), json.dumps({"model": rng.choice(["m", "m", "n"]), "messages": [
                {"role": "user", "content": text}], **fields}).encode(), None)
            input_tokens, output_tokens = rng.randint(1, 400), rng.randint(0, 900)
            engine.settle(decision, Outcome("a", 200, UsageReport(input_tokens, output_tokens, None, "", True),
                                            None, decision.started))
            self.plainly(expected, decision, input_tokens, output_tokens)
            if i == 200:
                # What the ledger holds (the same samples, its own arithmetic), read back as a
                # reload does: equal rows are shared again, and the updates go on from there.
                ledger.learned, ledger.learned_version = ledger.load_learning(), ledger.learned_version + 1
                engine.priors()
                expected = {key: RatioStats(row.mean, row.variance, row.count) for key, row in ledger.learned.items()}
            assert [(k, astuple(v)) for k, v in engine.learned.items()] == \
                [(k, astuple(v)) for k, v in expected.items()]
            # and the priors, brought up to date after each answer, are those built afresh
            priors = engine.priors()
            afresh = RatioPriors(engine.learned, priors.default, engine.replies, priors.default_replies)
            assert (priors.by_policy, priors.all_replies, priors.model_weight, priors.policy_weight, priors.pair_weight,
                    priors.variant_weight) == (afresh.by_policy, afresh.all_replies, afresh.model_weight,
                                               afresh.policy_weight, afresh.pair_weight, afresh.variant_weight)
        ledger.close()

    def test_one_models_rows_are_updated_once(self, tmp_path):
        ledger = Ledger(str(tmp_path / "l.db"), reload_interval=0)
        engine = Engine(make_config(*self.CONFIG), ledger)
        for _ in range(3):
            settle(engine, UsageReport(100, 30, None, "", True))
        assert len(engine.learned) == 3 and len({id(stats) for stats in engine.learned.values()}) == 1
        ledger.learned, ledger.learned_version = ledger.load_learning(), ledger.learned_version + 1
        engine.priors()
        assert len({id(stats) for stats in engine.learned.values()}) == 1
        ledger.close()


class TestProviderRecord:
    def test_billed_failures_send_requests_to_a_steadier_provider(self):
        config = make_config(provider_toml("flaky", "https://f.example", ["m"], 1, 1),
                             provider_toml("steady", "https://s.example", ["m"], "1.3", "1.3"))
        engine = Engine(config)
        assert engine.decide("r", body(), None).plan.best.provider == "flaky"
        for _ in range(6):
            decision = engine.decide("r", body(), None)
            engine.settle(decision, Outcome("steady", 200, UsageReport(100, 100, None, "", True), None,
                                            decision.started, failures=(("flaky", "header_timeout"),)))
        assert engine.track.outlook("flaky").success_rate < 0.5
        assert engine.decide("r", body(), None).plan.best.provider == "steady"

    def test_ranking_on_price_alone_keeps_a_failing_provider_first(self):
        config = make_config(provider_toml("flaky", "https://f.example", ["m"], 1, 1),
                             provider_toml("steady", "https://s.example", ["m"], "1.3", "1.3"),
                             extra="[routing]\nrank_by_success_rate = false\n")
        engine = Engine(config)
        for _ in range(6):
            decision = engine.decide("r", body(), None)
            engine.settle(decision, Outcome("steady", 200, UsageReport(100, 100, None, "", True), None,
                                            decision.started, failures=(("flaky", "header_timeout"),)))
        assert engine.decide("r", body(), None).plan.best.provider == "flaky"

    @pytest.mark.parametrize("cause, best", [("status", "flaky"), ("header_timeout", "steady")])
    def test_refusals_cost_nothing_so_they_do_not_outweigh_a_lower_price(self, cause, best):
        config = make_config(provider_toml("flaky", "https://f.example", ["m"], 1, 1),
                             provider_toml("steady", "https://s.example", ["m"], "1.3", "1.3"))
        engine = Engine(config)
        for i in range(40):  # flaky fails every other request: refused (free), or timed out (maybe billed)
            decision = engine.decide("r", body(), None)
            outcome = Outcome("flaky", 200, UsageReport(100, 100, None, "", True), None, decision.started) if i % 2 \
                else Outcome("steady", 200, UsageReport(100, 100, None, "", True), None, decision.started,
                             failures=(("flaky", cause),))
            engine.settle(decision, outcome)
        assert engine.track.outlook("flaky").success_rate == pytest.approx(0.5, abs=0.1)
        assert engine.decide("r", body(), None).plan.best.provider == best

    def test_a_provider_passed_over_after_a_bad_start_gets_its_chance_back(self):
        config = make_config(provider_toml("cheap", "https://c.example", ["m"], 1, 1),
                             provider_toml("steady", "https://s.example", ["m"], "1.3", "1.3"))
        engine = Engine(config)
        now = [0.0]
        engine.track.clock = lambda: now[0]
        decision = engine.decide("r", body(), None)
        engine.settle(decision, Outcome("steady", 200, UsageReport(100, 100, None, "", True), None,
                                        decision.started, failures=(("cheap", "header_timeout"),)))
        assert engine.decide("r", body(), None).plan.best.provider == "steady"  # never tried first again...
        now[0] += 10 * RELIABILITY_HALF_LIFE
        assert engine.decide("r", body(), None).plan.best.provider == "cheap"  # ...until its failure has faded

    def test_a_stream_the_client_left_says_nothing_about_the_provider(self, engine):
        decision = engine.decide("r", body(stream=True), None)
        engine.settle(decision, Outcome("a", 200, None, None, decision.started, error="the client went away",
                                        client_gone=True))
        assert engine.track.outlook("a").success_rate == 1.0

    def test_cache_reads_are_learned_from_usage(self, engine):
        decision = engine.decide("r", body(), None)
        usage = UsageReport(1000, 10, None, "", True, cache_read_tokens=500, cache_read_msats=100)  # a's input: 1 msat/token
        engine.settle(decision, Outcome("a", 200, usage, None, decision.started))
        assert engine.track.outlook("a").input_factor == Decimal("0.6")


class TestChargeChecks:
    def test_an_overcharger_is_logged_once_and_demoted(self, caplog):
        config = make_config(provider_toml("cheat", "https://c.example", ["m"], 1, 1),
                             provider_toml("honest", "https://h.example", ["m"], "1.5", "1.5"))
        engine = Engine(config)
        for _ in range(3):
            decision = engine.decide("r", body(), None)
            assert decision.plan.best.provider == "cheat"
            # 100 + 100 tokens at 1 msat each: 200 msats advertised, 300 billed
            engine.settle(decision, Outcome("cheat", 200, UsageReport(100, 100, 300, "", True), None, decision.started))
        assert engine.decide("r", body(), None).plan.best.provider == "honest"
        assert engine.track.charges("cheat").overcharged == 3 and engine.track.standing("cheat") == "demoted"
        warnings = [r.getMessage() for r in caplog.records if "above its advertised prices" in r.getMessage()]
        assert len(warnings) == 1 and "cheat charged 300 msats" in warnings[0] and "100 msats above" in warnings[0]

    def test_exclude_takes_it_out_of_the_plan(self):
        config = make_config(provider_toml("cheat", "https://c.example", ["m"], 1, 1),
                             provider_toml("honest", "https://h.example", ["m"], "1.5", "1.5"),
                             extra="[routing]\novercharge_action = \"exclude\"\n")
        engine = Engine(config)
        for _ in range(3):
            decision = engine.decide("r", body(), None)
            engine.settle(decision, Outcome("cheat", 200, UsageReport(100, 100, 300, "", True), None, decision.started))
        plan = engine.decide("r", body(), None).plan
        assert [c.provider for c in plan.candidates] == ["honest"]
        assert plan.exclusions[0].reason == "charged above its advertised prices on 3 of 3 checked requests"

    def test_an_honest_charge_is_checked_and_not_counted(self, engine):
        settle(engine, UsageReport(100, 50, 200, "", True))  # a: 100 × 1 + 50 × 2 msats
        assert engine.track.charges("a").checked == 1 and engine.track.charges("a").overcharged == 0

