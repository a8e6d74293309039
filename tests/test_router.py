import random
from decimal import Decimal

import pytest

from arbstr.errors import InsufficientFunds, ModelNotAllowed, ModelNotFound, NoEligibleProvider
from arbstr.policy import Pinning, Policy
from arbstr.pricing import Rates, estimate_cost
from arbstr.estimator import Outlook, ProviderOutlook, RatioStats, forecast_output
from arbstr.router import Catalogue, ProviderOffer, RouteRequest, Unpayable, plan_route

from conftest import make_config, provider_toml

DEFAULT = Policy("default", "cheapest")


def offer(provider: str, model: str, inp: str, out: str, fee: str = "0", rank: int = 0) -> ProviderOffer:
    return ProviderOffer(provider, model, Rates(Decimal(inp), Decimal(out), Decimal(fee)), rank)


def route(request: RouteRequest, catalogue: Catalogue, policy: Policy, ratio: float, unavailable=None, *,
          cap: int | None = None, providers: dict[str, ProviderOutlook] | None = None, risk: str = "0",
          unpayable: dict[str, Unpayable] | None = None):
    """A plan for a reply of exactly `ratio` × the input (capped), and the given provider records."""
    forecast = forecast_output(request.input_tokens, RatioStats(ratio, 0.0, 1), cap)
    return plan_route(request, catalogue, policy, Outlook(forecast, providers or {}, float(risk)), unavailable,
                      unpayable)


def names(plan) -> list[str]:
    return [c.provider for c in plan.candidates]


class TestRanking:
    def test_cheapest_first_with_estimates(self):
        catalogue = Catalogue([offer("a", "m", "10", "10", rank=0), offer("b", "m", "1", "1", rank=1)])
        plan = route(RouteRequest("m", 1000), catalogue, DEFAULT, 1.0)
        assert names(plan) == ["b", "a"]
        assert plan.output_tokens == 1000
        assert [c.estimated_cost for c in plan.candidates] == [Decimal(2), Decimal(20)]

    def test_output_ratio_decides_between_input_and_output_heavy_prices(self):
        catalogue = Catalogue([offer("cheap-in", "m", "1", "20", rank=0), offer("cheap-out", "m", "10", "2", rank=1)])
        short_replies = route(RouteRequest("m", 1000), catalogue, DEFAULT, 0.1)
        long_replies = route(RouteRequest("m", 1000), catalogue, DEFAULT, 5.0)
        assert names(short_replies)[0] == "cheap-in"
        assert names(long_replies)[0] == "cheap-out"

    def test_max_tokens_caps_the_output_estimate(self):
        catalogue = Catalogue([offer("cheap-in", "m", "1", "20", rank=0), offer("cheap-out", "m", "10", "2", rank=1)])
        plan = route(RouteRequest("m", 1000), catalogue, DEFAULT, 5.0, cap=10)
        assert plan.output_tokens == 10
        assert names(plan)[0] == "cheap-in"

    def test_base_fee_counts(self):
        catalogue = Catalogue([offer("fee", "m", "1", "1", fee="1", rank=0), offer("nofee", "m", "2", "2", rank=1)])
        assert names(route(RouteRequest("m", 10), catalogue, DEFAULT, 1.0))[0] == "nofee"
        assert names(route(RouteRequest("m", 10000), catalogue, DEFAULT, 1.0))[0] == "fee"

    def test_fractional_rates_compare_exactly(self):
        # 0.1 + 0.2 style rates that floats would get wrong: a costs exactly what b costs + 0
        catalogue = Catalogue([offer("a", "m", "0.3", "0", rank=1), offer("b", "m", "0.1", "0.2", rank=0)])
        plan = route(RouteRequest("m", 1000), catalogue, DEFAULT, 1.0)
        assert plan.candidates[0].estimated_cost == plan.candidates[1].estimated_cost == Decimal("0.3")
        assert names(plan) == ["b", "a"]  # a tie: config order decides

    def test_ties_follow_config_order_whatever_the_input_order(self):
        offers = [offer(f"p{i}", "m", "1", "1", rank=i) for i in range(20)]
        for seed in range(5):
            shuffled = offers[:]
            random.Random(seed).shuffle(shuffled)
            assert names(route(RouteRequest("m", 50), Catalogue(shuffled), DEFAULT, 1.0)) == [f"p{i}" for i in range(20)]

    def test_only_providers_of_the_model(self):
        catalogue = Catalogue([offer("a", "x", "1", "1"), offer("b", "m", "5", "5", rank=1)])
        assert names(route(RouteRequest("m", 10), catalogue, DEFAULT, 1.0)) == ["b"]

    def test_estimate_matches_pricing(self):
        o = offer("a", "m", "3.03", "6.5", "0.001")
        plan = route(RouteRequest("m", 123), Catalogue([o]), DEFAULT, 0.7)
        assert plan.best.estimated_cost == estimate_cost(o.rates, 123, Decimal("86.1"))

    def test_randomized_plans_are_sorted_and_complete(self):
        rng = random.Random(7)
        for _ in range(200):
            offers = [offer(f"p{i}", "m", str(rng.randint(0, 50) / 10), str(rng.randint(0, 50) / 10),
                            str(rng.randint(0, 3) / 1000), rank=i) for i in range(rng.randint(1, 12))]
            plan = route(RouteRequest("m", rng.randint(0, 5000)), Catalogue(offers), DEFAULT, rng.random() * 3)
            keys = [(c.estimated_cost, c.offer.rank) for c in plan.candidates]
            assert keys == sorted(keys) and len(keys) == len(offers)


class TestNoPlan:
    def test_unknown_model_lists_available(self):
        catalogue = Catalogue([offer("a", "m1", "1", "1"), offer("a", "m2", "1", "1")])
        with pytest.raises(ModelNotFound) as err:
            route(RouteRequest("gpt-9", 10), catalogue, DEFAULT, 1.0)
        assert err.value.status == 404 and err.value.code == "model_not_found"
        assert "'gpt-9'" in err.value.message and "m1, m2" in err.value.message

    def test_empty_catalogue(self):
        with pytest.raises(ModelNotFound):
            route(RouteRequest("m", 10), Catalogue([]), DEFAULT, 1.0)

    def test_policy_forbids_model(self):
        policy = Policy("strict", "cheapest", allowed_models=frozenset({"small"}))
        with pytest.raises(ModelNotAllowed) as err:
            route(RouteRequest("m", 10), Catalogue([offer("a", "m", "1", "1")]), policy, 1.0)
        assert err.value.status == 400 and "Policy 'strict' does not allow model 'm'" in err.value.message

    def test_each_exclusion_is_explained(self):
        policy = Policy("thrifty", "cheapest", max_sats_per_1k_output=Decimal(5), max_sats_per_request=Decimal("0.5"))
        catalogue = Catalogue([offer("pricey", "m", "1", "8", rank=0), offer("big", "m", "4", "4", rank=1)])
        with pytest.raises(NoEligibleProvider) as err:
            route(RouteRequest("m", 100), catalogue, policy, 1.0)
        assert err.value.status == 400
        assert "pricey: output rate 8 sats/1k exceeds max_sats_per_1k_output 5" in err.value.message
        assert "big: estimated 0.8 sats exceeds max_sats_per_request 0.5" in err.value.message
        assert [e["provider"] for e in err.value.details["exclusions"]] == ["pricey", "big"]

    def test_exclusions_kept_beside_candidates(self):
        policy = Policy("p", "cheapest", max_sats_per_1k_output=Decimal(5))
        catalogue = Catalogue([offer("pricey", "m", "0", "8"), offer("ok", "m", "9", "5", rank=1)])
        plan = route(RouteRequest("m", 100), catalogue, policy, 1.0)
        assert names(plan) == ["ok"] and [e.provider for e in plan.exclusions] == ["pricey"]

    def test_unavailable_providers_go_last_with_their_reason(self):
        catalogue = Catalogue([offer("down", "m", "0", "0"), offer("up", "m", "9", "9", rank=1),
                               offer("down2", "m", "1", "1", rank=2)])
        plan = route(RouteRequest("m", 10), catalogue, DEFAULT, 1.0,
                          unavailable={"down": "circuit open", "down2": "out of funds"})
        assert names(plan) == ["up", "down", "down2"]
        assert [(e.provider, e.reason) for e in plan.deferred] == [("down", "circuit open"), ("down2", "out of funds")]
        assert plan.exclusions == ()

    def test_all_unavailable_still_gives_a_plan(self):
        catalogue = Catalogue([offer("a", "m", "1", "1")])
        plan = route(RouteRequest("m", 10), catalogue, DEFAULT, 1.0, unavailable={"a": "circuit open"})
        assert names(plan) == ["a"]


class TestPayability:
    CATALOGUE = Catalogue([offer("xcashu", "m", "1", "1"), offer("foreign", "m", "2", "2", rank=1),
                           offer("keyed", "m", "9", "9", rank=2)])

    def test_a_provider_the_wallet_cannot_pay_is_left_out_with_why(self):
        plan = route(RouteRequest("m", 10), self.CATALOGUE, DEFAULT, 1.0, unpayable={
            "xcashu": Unpayable("paying it needs 30 sats from the wallet, which holds 12 (18 sats short)", 18),
            "foreign": Unpayable("foreign takes ecash from https://other.mint only")})
        assert names(plan) == ["keyed"]
        assert [(e.provider, e.reason[:20]) for e in plan.exclusions] == [
            ("xcashu", "paying it needs 30 s"), ("foreign", "foreign takes ecash ")]

    def test_none_payable_is_a_402_naming_the_smallest_shortfall(self):
        with pytest.raises(InsufficientFunds) as err:
            route(RouteRequest("m", 10), Catalogue(list(self.CATALOGUE.by_model["m"])[:2]), DEFAULT, 1.0, unpayable={
                "xcashu": Unpayable("needs 30 (18 sats short)", 18), "foreign": Unpayable("another mint")})
        assert err.value.status == 402 and err.value.code == "insufficient_funds"
        assert err.value.details == {"shortfall_sats": 18}
        assert "xcashu: needs 30 (18 sats short); foreign: another mint" in err.value.message

    def test_a_policy_exclusion_among_them_is_not_a_wallet_problem(self):
        policy = Policy("thrifty", "cheapest", max_sats_per_1k_output=Decimal(5))
        with pytest.raises(NoEligibleProvider):
            route(RouteRequest("m", 10), self.CATALOGUE, policy, 1.0,  # keyed's rate is over the policy's
                  unpayable={"xcashu": Unpayable("short", 1), "foreign": Unpayable("short", 2),
                             "keyed": Unpayable("short", 3)})


class TestFromConfig:
    def test_catalogue_from_providers_keeps_config_rank(self):
        config = make_config(provider_toml("a", "https://a.example", ["m", "n"], 2, 2),
                             provider_toml("b", "https://b.example", ["m"], 2, 2))
        catalogue = Catalogue.from_providers(config.providers)
        assert catalogue.models() == ["m", "n"]
        assert [(o.provider, o.rank) for o in catalogue.by_model["m"]] == [("a", 0), ("b", 1)]


class TestExpectedCostPerAnswer:
    def test_a_cheap_but_flaky_provider_loses_when_its_failures_are_billed(self):
        catalogue = Catalogue([offer("flaky", "m", "1", "1", rank=0), offer("steady", "m", "1.2", "1.2", rank=1)])
        flaky = ProviderOutlook(success_rate=0.6, charged_failure_share=1.0)
        plan = route(RouteRequest("m", 1000), catalogue, DEFAULT, 1.0, providers={"flaky": flaky})
        assert names(plan) == ["steady", "flaky"]
        # 2 sats if it answers, and per answer 0.4/0.6 billed failures of 2 sats each on top
        assert plan.candidate("flaky").estimate.score == pytest.approx(2 + 0.4 / 0.6 * 2)

    def test_failures_that_cost_nothing_leave_the_cheap_provider_first(self):
        catalogue = Catalogue([offer("flaky", "m", "1", "1", rank=0), offer("steady", "m", "1.2", "1.2", rank=1)])
        unbilled = ProviderOutlook(success_rate=0.6, charged_failure_share=0.0)
        assert names(route(RouteRequest("m", 1000), catalogue, DEFAULT, 1.0, providers={"flaky": unbilled}))[0] == "flaky"

    def test_a_penalty_per_failure_counts_the_wait(self):
        catalogue = Catalogue([offer("flaky", "m", "1", "1", rank=0), offer("steady", "m", "1.2", "1.2", rank=1)])
        unbilled = ProviderOutlook(success_rate=0.6, charged_failure_share=0.0)
        forecast = forecast_output(1000, RatioStats(1.0, 0.0, 1), None)
        outlook = Outlook(forecast, {"flaky": unbilled}, failure_penalty=1.0)
        assert names(plan_route(RouteRequest("m", 1000), catalogue, DEFAULT, outlook))[0] == "steady"

    def test_cheaper_cache_reads_lower_the_effective_input_price(self):
        catalogue = Catalogue([offer("cached", "m", "2", "1", rank=1), offer("plain", "m", "1.5", "1", rank=0)])
        cache = ProviderOutlook(input_factor=Decimal("0.5"))
        plan = route(RouteRequest("m", 1000), catalogue, DEFAULT, 1.0, providers={"cached": cache})
        assert names(plan) == ["cached", "plain"]
        assert plan.best.estimated_cost == Decimal(2)  # 1000 × 2 × 0.5 + 1000 × 1, per 1k

    def test_demoted_providers_go_after_every_other(self):
        catalogue = Catalogue([offer("cheat", "m", "0.1", "0.1", rank=0), offer("honest", "m", "5", "5", rank=1)])
        plan = route(RouteRequest("m", 100), catalogue, DEFAULT, 1.0, providers={"cheat": ProviderOutlook(demoted=True)})
        assert names(plan) == ["honest", "cheat"]


class TestUncertainty:
    SHAPES = Catalogue([offer("out-heavy", "m", "1", "3", rank=0), offer("in-heavy", "m", "1.5", "2", rank=1)])

    def plan(self, variance: float, risk: str):
        forecast = forecast_output(1000, RatioStats(0.5, variance, 10), None)
        return plan_route(RouteRequest("m", 1000), self.SHAPES, DEFAULT, Outlook(forecast, {}, float(risk)))

    def test_on_a_tie_the_cost_less_sensitive_to_reply_length_wins(self):
        # Both cost 2.5 sats at the expected 500 output tokens; out-heavy swings 3 sats per 1k of them.
        plan = self.plan(variance=0.25, risk="0")
        assert [c.estimated_cost for c in plan.candidates] == [Decimal("2.5"), Decimal("2.5")]
        assert names(plan) == ["in-heavy", "out-heavy"]
        assert plan.candidate("out-heavy").estimate.spread > plan.candidate("in-heavy").estimate.spread

    def test_risk_aversion_only_flips_near_ties(self):
        cheaper = Catalogue([offer("out-heavy", "m", "0.9", "3", rank=0), offer("in-heavy", "m", "1.5", "2", rank=1)])
        forecast = forecast_output(1000, RatioStats(0.5, 0.25, 10), None)
        near = plan_route(RouteRequest("m", 1000), cheaper, DEFAULT, Outlook(forecast, {}, 0.5))
        indifferent = plan_route(RouteRequest("m", 1000), cheaper, DEFAULT, Outlook(forecast, {}, 0.0))
        assert names(near)[0] == "in-heavy" and names(indifferent)[0] == "out-heavy"
        far = Catalogue([offer("out-heavy", "m", "0.1", "3", rank=0), offer("in-heavy", "m", "1.5", "2", rank=1)])
        assert names(plan_route(RouteRequest("m", 1000), far, DEFAULT, Outlook(forecast, {}, 0.5)))[0] \
            == "out-heavy"

    def test_a_cap_lowers_the_expected_cost_below_the_cost_at_the_capped_mean(self):
        forecast = forecast_output(1000, RatioStats(0.5, 0.5, 10), 500)
        assert forecast.mean < 500 and forecast.sd > 0


class TestPinning:
    CATALOGUE = Catalogue([offer("a", "m", "1", "1", rank=0), offer("b", "m", "2", "2", rank=1),
                           offer("c", "m", "30", "30", rank=2), offer("z", "other", "1", "1", rank=3)])

    def test_a_pin_restricts_the_candidates_and_says_why_the_others_are_out(self):
        plan = route(RouteRequest("m", 100, pinning=Pinning(frozenset({"b", "c"}))), self.CATALOGUE, DEFAULT, 1.0)
        assert names(plan) == ["b", "c"] and plan.allow_fallback
        assert [(e.provider, e.reason) for e in plan.exclusions] == [("a", "not pinned by X-Arbstr-Provider")]

    def test_the_policy_and_the_pin_both_restrict(self):
        policy = Policy("p", "cheapest", providers=frozenset({"a", "b"}))
        assert names(route(RouteRequest("m", 100), self.CATALOGUE, policy, 1.0)) == ["a", "b"]
        pinned = route(RouteRequest("m", 100, pinning=Pinning(frozenset({"b", "c"}))), self.CATALOGUE, policy, 1.0)
        assert names(pinned) == ["b"]
        assert dict((e.provider, e.reason) for e in pinned.exclusions) == {
            "a": "not pinned by X-Arbstr-Provider", "c": "not among policy 'p' providers"}

    def test_a_pinned_provider_without_the_model_is_a_clear_error(self):
        with pytest.raises(NoEligibleProvider) as err:
            route(RouteRequest("m", 100, pinning=Pinning(frozenset({"z"}))), self.CATALOGUE, DEFAULT, 1.0)
        assert "z: does not offer 'm'" in err.value.message and "a: not pinned" in err.value.message

    def test_fallback_is_off_when_either_the_client_or_the_policy_says_so(self):
        strict = Policy("strict", "cheapest", allow_fallback=False)
        off = Pinning(frozenset({"a"}), allow_fallback=False)
        assert not route(RouteRequest("m", 100, pinning=off), self.CATALOGUE, DEFAULT, 1.0).allow_fallback
        assert not route(RouteRequest("m", 100), self.CATALOGUE, strict, 1.0).allow_fallback
        assert route(RouteRequest("m", 100, pinning=Pinning(frozenset({"a"}))), self.CATALOGUE, DEFAULT,
                     1.0).allow_fallback

    def test_max_price_ratio_holds_back_the_dear_even_when_the_cheapest_is_down(self):
        policy = Policy("ratio", "cheapest", max_price_ratio=Decimal(2))
        plan = route(RouteRequest("m", 1000), self.CATALOGUE, policy, 1.0, unavailable={"a": "breaker open"})
        # a: 2 sats, b: 4 sats (exactly 2×: allowed), c: 60 sats (30×: held back)
        assert names(plan) == ["b", "a"]
        assert [(e.provider, e.reason) for e in plan.held_back] == [
            ("c", "estimated 60 sats is more than 2× the cheapest candidate's 2 sats (max_price_ratio)")]
        assert [e.provider for e in plan.deferred] == ["a"]
