import copy
import math
import random
import statistics
from dataclasses import astuple
from decimal import Decimal

import pytest

from arbstr.estimator import (_OUTLOOK_REFRESH, _Z, DEFAULT_WEIGHT, MAX_PRIOR_WEIGHT, MIN_PRIOR_WEIGHT, PRIOR_WEIGHT,
                              RELIABILITY_HALF_LIFE, RELIABILITY_PRIOR, RELIABILITY_WINDOW, ChargeTotals,
                              OutputForecast, ProviderTrack, RatioPredictor, RatioPriors, RatioStats, RequestShape,
                              default_ratio, default_replies, forecast_output, learning_keys, learning_rows,
                              milli_tokens, pool, prior_weight, shrink, update_ratio, variant_key)
from arbstr.pricing import ChargeCheck

DEFAULT = default_ratio(1.0)


def learn(samples: list[tuple[int, int]], state: RatioStats | None = None) -> RatioStats:
    for inp, out in samples:
        state = update_ratio(state, inp, out)
    return state


class TestUpdateRatio:
    def test_first_samples_are_a_plain_mean_and_variance(self):
        state = learn([(100, 50), (100, 150), (100, 100)])
        assert state.mean == pytest.approx(1.0)
        assert state.variance == pytest.approx(statistics.pvariance([0.5, 1.5, 1.0]))
        assert state.count == 3

    def test_an_outlier_moves_the_mean_by_a_bounded_amount(self):
        state = learn([(100, 100)] * 10)
        after = update_ratio(state, 1, 100_000)  # a runaway reply: ratio 100000, clamped to 4
        assert after.mean == pytest.approx(1.0 + (4.0 - 1.0) / 11)
        assert after.count == 11

    def test_a_tiny_sample_is_clamped_too(self):
        state = learn([(100, 100)] * 10)
        assert update_ratio(state, 100_000, 1).mean == pytest.approx(1.0 - (1.0 - 0.25) / 11)

    def test_it_follows_a_lasting_change(self):
        state = learn([(100, 100)] * 200 + [(100, 300)] * 300)
        assert state.mean == pytest.approx(3.0, rel=0.01)
        assert state.variance < 0.01

    def test_zero_input_does_not_divide_by_zero(self):
        assert update_ratio(None, 0, 5) == RatioStats(5.0, 0.0, 1)


class TestPooling:
    def test_pool_is_the_distribution_of_all_samples(self):
        a, b = [0.5, 1.0, 1.5], [3.0, 5.0]
        pooled = pool([learn([(100, round(100 * r)) for r in a]), learn([(100, round(100 * r)) for r in b])])
        assert pooled.mean == pytest.approx(statistics.mean(a + b))
        assert pooled.variance == pytest.approx(statistics.pvariance(a + b))
        assert pooled.count == 5

    def test_pool_of_nothing_is_none(self):
        assert pool([]) is None and pool([RatioStats(1, 0, 0)]) is None

    def test_shrink_weighs_own_history_against_the_prior(self):
        own, prior = RatioStats(3.0, 0.0, PRIOR_WEIGHT), RatioStats(1.0, 0.0, 100)
        assert shrink(own, prior).mean == pytest.approx(2.0)
        assert shrink(None, prior) is prior
        assert shrink(RatioStats(3.0, 0.0, 1000), prior).mean == pytest.approx(3.0, rel=0.01)


class TestPriors:
    def test_nothing_learned_gives_the_configured_default(self):
        ratio = RatioPriors({}, default_ratio(0.7)).ratio("code", "m", input_tokens=100)
        assert ratio.mean == 0.7 and ratio.variance == pytest.approx(0.49)

    def test_nothing_learned_assumes_a_reply_length_not_a_ratio(self):
        priors = RatioPriors({}, default_ratio(1.0), default_replies=default_replies(200))
        # a long document and a short prompt are both expected to get about 200 tokens back
        assert priors.ratio("code", "m", input_tokens=4000).mean == pytest.approx(0.05)
        assert priors.ratio("code", "m", input_tokens=50).mean == pytest.approx(4.0)
        assert priors.ratio("code", "m", input_tokens=4000).variance == pytest.approx(0.05 ** 2)
        # with no input size to divide by, the ratio default stands
        assert priors.ratio("code", "m", input_tokens=0).mean == 1.0

    def test_the_assumed_reply_length_is_outweighed_by_the_first_answers(self):
        replies = {"m": RatioStats(1000.0, 0.0, 9)}
        priors = RatioPriors({}, default_ratio(1.0), replies, default_replies(200))
        # everything's replies: nine answers of 1000 tokens against one assumed sample of 200, then the
        # model's own nine against that prior counted as PRIOR_WEIGHT samples
        everything = (9 * 1000 + 200) / 10
        model = (9 * 1000 + PRIOR_WEIGHT * everything) / (9 + PRIOR_WEIGHT)
        assert priors.ratio("code", "m", input_tokens=1000).mean == pytest.approx(model / 1000)

    def test_a_new_pair_starts_from_its_policy(self):
        learned = {("code", "big"): RatioStats(4.0, 0.1, 40), ("chat", "big"): RatioStats(0.5, 0.01, 40)}
        priors = RatioPriors(learned, DEFAULT)
        # The policies differ far more than their samples spread: each leans on its own history.
        assert priors.policy_weight == MIN_PRIOR_WEIGHT
        assert priors.ratio("code", "small").mean == pytest.approx(4.0, rel=0.05)
        assert priors.ratio("chat", "small").mean == pytest.approx(0.5, rel=0.05)

    def test_a_new_policy_starts_from_the_reply_lengths_of_its_model(self):
        # write: 100-token prompts, 500-token replies; a new policy with a 4,000-token document is
        # expected to be answered at about that length, not at write's ratio of 5.
        learned = {("write", "m"): RatioStats(5.0, 1.0, 40)}
        priors = RatioPriors(learned, DEFAULT, {"m": RatioStats(500.0, 100.0 ** 2, 40)})
        everything = (40 * 500 / 4000 + DEFAULT_WEIGHT * 1.0) / (40 + DEFAULT_WEIGHT)
        # Only one model: how much its replies differ from everything's cannot be measured.
        expected = (40 * 500 / 4000 + PRIOR_WEIGHT * everything) / (40 + PRIOR_WEIGHT)
        assert priors.ratio("summarize", "m", input_tokens=4000).mean == pytest.approx(expected)
        assert expected < 0.15
        assert priors.ratio("write", "m", input_tokens=100).mean == pytest.approx(5.0, rel=0.05)

    def test_another_models_replies_count_through_everything(self):
        priors = RatioPriors({}, DEFAULT, {"m": RatioStats(200.0, 0.0, 100)})
        assert priors.ratio("p", "unseen", input_tokens=1000).mean == pytest.approx((100 * 0.2 + 1.0) / 101)

    def test_a_policys_history_from_before_per_model_learning_still_counts(self):
        priors = RatioPriors({("code", ""): RatioStats(3.0, 0.1, 100)}, DEFAULT)
        assert priors.ratio("code", "m").mean == pytest.approx((3.0 * 100 + 1.0 * PRIOR_WEIGHT) / (100 + PRIOR_WEIGHT))

    def test_each_shape_is_learned_apart_with_the_pair_as_its_prior(self):
        shape, plain = RequestShape("code", "m", 100, signals=frozenset({"json"})), RequestShape("code", "m", 100)
        assert learning_keys(shape) == [("code", "m"), ("code[json]", "m")]
        assert learning_keys(plain) == [("code", "m"), ("code[]", "m")]
        # the rows an answer updates: each key's own, and the policy's pooled over its models
        assert learning_rows(shape) == (("code", "m"), ("code", "*"), ("code[json]", "m"))
        assert learning_rows(plain) == (("code", "m"), ("code", "*"), ("code[]", "m"))
        learned = {("code", "m"): RatioStats(2.0, 0.0, 100)}
        assert RatioPriors(learned, DEFAULT).ratio("code", "m", shape.signals).mean == pytest.approx(2.0, rel=0.05)
        # JSON requests answered short, plain ones long: the pair holds both.
        json, rest = RatioStats(0.2, 0.01, 100), RatioStats(2.0, 0.36, 100)
        learned = {("code", "m"): pool([json, rest]), ("code[json]", "m"): json, ("code[]", "m"): rest}
        priors = RatioPriors(learned, DEFAULT)
        assert priors.variant_weight == MIN_PRIOR_WEIGHT  # the shapes differ far more than their samples spread
        assert priors.ratio("code", "m", shape.signals).mean == pytest.approx(0.2, rel=0.05)
        # The short JSON answers do not shorten the forecast for plain requests...
        assert priors.ratio("code", "m").mean == pytest.approx(2.0, rel=0.05)
        # ...while a model new to the policy starts from all of the policy's answers.
        assert priors.ratio("code", "other").mean == pytest.approx(1.1, rel=0.05)

    def test_one_sample_of_each_policy_is_not_taken_for_the_truth(self):
        # One answer each: how much the policies' replies really spread cannot be told yet, so a
        # policy's single (perhaps unusual) answer counts for one sample against PRIOR_WEIGHT.
        learned = {("chat", "m"): RatioStats(1.7, 0.0, 1), ("write", "m"): RatioStats(5.0, 0.0, 1)}
        priors = RatioPriors(learned, DEFAULT)
        assert priors.policy_weight == priors.pair_weight == priors.variant_weight == PRIOR_WEIGHT


class TestPriorWeight:
    def test_unmeasurable_with_fewer_than_two_groups(self):
        assert prior_weight([]) == prior_weight([RatioStats(1.0, 0.5, 10)]) == PRIOR_WEIGHT

    def test_unmeasurable_with_one_sample_a_group(self):
        # two single answers differ by chance as much as by anything else
        assert prior_weight([RatioStats(0.1, 0.0, 1), RatioStats(5.0, 0.0, 1)]) == PRIOR_WEIGHT

    def test_alike_groups_lean_on_the_pool(self):
        # relative within: (50 × 0.25/1 + 50 × 0.4225/1.69)/98; means 0.13 from the pooled 1.15,
        # less what the within spread alone would make them differ
        within = 25 / 98
        between = (100 * (0.15 / 1.15) ** 2 - within) / (100 - 2 * 50 ** 2 / 100)
        weight = prior_weight([RatioStats(1.0, 0.25, 50), RatioStats(1.3, 0.4225, 50)])
        assert weight == pytest.approx(within / between) and weight > PRIOR_WEIGHT

    def test_different_groups_trust_their_own_history(self):
        within = (10 * 0.04 + 10 * 0.09 / 1.5 ** 2) / 18
        between = (20 * 0.2 ** 2 - within) / (20 - 2 * 10 ** 2 / 20)
        weight = prior_weight([RatioStats(1.0, 0.04, 10), RatioStats(1.5, 0.09, 10)])
        assert weight == pytest.approx(within / between) and weight < 1

    def test_spread_is_relative_to_the_mean(self):
        groups = [RatioStats(1.0, 0.04, 10), RatioStats(1.5, 0.09, 10)]
        scaled = [RatioStats(g.mean * 10, g.variance * 100, g.count) for g in groups]
        assert prior_weight(scaled) == pytest.approx(prior_weight(groups))

    def test_groups_are_compared_within_their_class(self):
        # two pairs' variants: alike within each pair, though the pairs differ tenfold
        a = [RatioStats(1.0, 0.25, 50), RatioStats(1.3, 0.4225, 50)]
        b = [RatioStats(10.0, 25.0, 50), RatioStats(13.0, 42.25, 50)]
        assert prior_weight(a, b) == pytest.approx(prior_weight(a)) and prior_weight(a, b) > PRIOR_WEIGHT
        assert prior_weight(a + b) < 1
        # a class of one group adds its spread within, not between
        assert PRIOR_WEIGHT < prior_weight(a, [RatioStats(7.0, 0.0, 1)]) == pytest.approx(prior_weight(a))

    def test_bounded(self):
        assert prior_weight([RatioStats(1.0, 0.5, 10), RatioStats(1.0, 0.5, 10)]) == MAX_PRIOR_WEIGHT
        assert prior_weight([RatioStats(0.1, 0.0, 10), RatioStats(5.0, 0.0, 10)]) == MIN_PRIOR_WEIGHT


class TestForecast:
    def test_without_spread_it_is_the_ratio_times_the_input(self):
        assert forecast_output(100, RatioStats(0.25, 0.0, 5), None).mean == 25
        assert forecast_output(3, RatioStats(0.1, 0.0, 5), None).mean == 1  # never below one token
        assert forecast_output(100, RatioStats(2.0, 0.0, 5), 50).mean == 50

    def test_with_spread_the_mean_is_kept_and_the_spread_matches(self):
        forecast = forecast_output(1000, RatioStats(0.5, 0.25, 10), None)
        assert forecast.mean == pytest.approx(500)
        assert forecast.sd == pytest.approx(500, rel=0.25)  # the quantile grid trims the far tail

    def test_the_cap_clamps_the_distribution_not_just_its_mean(self):
        capped = forecast_output(1000, RatioStats(0.5, 0.25, 10), 500)
        assert capped.mean < 500
        rng = random.Random(1)
        sigma2 = math.log1p(0.25 / 0.25)
        draws = [min(500.0, 1000 * math.exp(rng.gauss(math.log(0.5) - sigma2 / 2, math.sqrt(sigma2))))
                 for _ in range(20000)]
        assert capped.mean == pytest.approx(statistics.mean(draws), rel=0.03)

    def test_predictor_reads_the_shape(self):
        priors = RatioPriors({("code", "m"): RatioStats(2.0, 0.0, 1000)}, DEFAULT)
        predictor = RatioPredictor(priors)
        assert predictor.forecast(RequestShape("code", "m", 100)).mean == pytest.approx(200, rel=0.01)
        assert predictor.forecast(RequestShape("code", "m", 100, max_output_tokens=30)).mean == 30


def random_stats(rng: random.Random, count: float | None = None) -> RatioStats:
    mean = rng.choice([0.0, rng.uniform(0.01, 5), rng.uniform(1, 900)])
    variance = rng.choice([0.0, rng.uniform(0, 3) * mean * mean])
    return RatioStats(mean, variance, rng.choice([1, 2, 3, 7, 40, 1000, 2.5]) if count is None else count)


def random_priors(rng: random.Random) -> tuple[RatioPriors, list[str], list[str]]:
    """Priors over a few policies, models and shapes, with some levels missing and one-sample groups."""
    policies = [f"p{i}" for i in range(rng.randint(1, 4))]
    models = [f"m{i}" for i in range(rng.randint(1, 4))]
    learned = {}
    for _ in range(rng.randint(0, 20)):
        policy, kind = rng.choice(policies), rng.random()
        if kind < 0.2:
            learned[(policy, "*")] = random_stats(rng)
        elif kind < 0.6:
            learned[(variant_key(policy, frozenset(rng.choice([(), ("json",), ("json", "tools")]))),
                     rng.choice(models))] = random_stats(rng)
        else:
            learned[(policy, rng.choice(models))] = random_stats(rng)
    replies = {m: random_stats(rng, rng.choice([None, 0])) for m in rng.sample(models, rng.randint(0, len(models)))}
    defaults = rng.choice([None, default_replies(256), default_replies(1)])
    return RatioPriors(learned, default_ratio(rng.choice([1.0, 0.5])), replies, defaults), policies, models


def ratio_by_shrinking(priors: RatioPriors, policy: str, model: str, signals: frozenset[str],
                       input_tokens: int) -> RatioStats:
    """What `RatioPriors.ratio` is: the levels shrunk one into the next with `shrink`."""
    def per_input(replies: RatioStats | None) -> RatioStats | None:
        if replies is None or input_tokens <= 0:
            return None
        return RatioStats(replies.mean / input_tokens, replies.variance / input_tokens ** 2, replies.count)
    estimate = per_input(priors.default_replies) or priors.default
    estimate = shrink(per_input(priors.all_replies), estimate, DEFAULT_WEIGHT)
    estimate = shrink(per_input(priors.replies.get(model)), estimate, priors.model_weight)
    estimate = shrink(priors.by_policy.get(policy), estimate, priors.policy_weight)
    estimate = shrink(priors.learned.get((policy, model)), estimate, priors.pair_weight)
    return shrink(priors.learned.get((variant_key(policy, signals), model)), estimate, priors.variant_weight)


def forecast_plainly(input_tokens: int, ratio: RatioStats, cap: int | None) -> OutputForecast:
    """What `forecast_output` is: every quantile point raised to a token, capped, then averaged."""
    expected = max(1.0, input_tokens * ratio.mean)
    if ratio.variance <= 0 or ratio.mean <= 0:
        points = [expected]
    else:
        sigma2 = math.log1p(ratio.variance / ratio.mean ** 2)
        points = [math.exp(math.sqrt(sigma2) * z - sigma2 / 2) for z in _Z]
        scale = expected * len(points) / sum(points)
        points = [max(1.0, p * scale) for p in points]
    if cap:
        points = [min(p, cap) for p in points]
    mean = sum(points) / len(points)
    return OutputForecast(mean, math.sqrt(sum([(p - mean) ** 2 for p in points]) / len(points)))


def same_figures(a: RatioStats | OutputForecast, b: RatioStats | OutputForecast) -> bool:
    """Equal to the last bit, and of the same types (an int count stays an int)."""
    return [(x, type(x)) for x in astuple(a)] == [(x, type(x)) for x in astuple(b)]


class TestShortcuts:
    """The estimator's per-request arithmetic, written for speed, against the plain computations:
    the same figures to the last bit on generated inputs."""

    def test_ratio_is_the_levels_shrunk_into_each_other(self):
        rng = random.Random(7)
        for _ in range(1500):
            priors, policies, models = random_priors(rng)
            for _ in range(4):
                args = (rng.choice(policies + ["unseen"]), rng.choice(models + ["unseen"]),
                        frozenset(rng.choice([(), ("json",), ("json", "tools")])), rng.choice([0, 1, 14, 1000, 123457]))
                assert same_figures(priors.ratio(*args), ratio_by_shrinking(priors, *args)), args

    def test_the_weights_are_measured_when_a_class_has_two_groups(self):
        rng = random.Random(8)
        for _ in range(1500):
            priors, _, _ = random_priors(rng)
            classes: dict[str, list[RatioStats]] = {}
            for (policy, model), stats in priors.learned.items():
                if model != "*" and "[" not in policy:
                    classes.setdefault(policy, []).append(stats)
            assert priors.pair_weight == prior_weight(*classes.values())
            assert priors.model_weight == prior_weight(priors.replies.values())
            assert priors.policy_weight == prior_weight(priors.by_policy.values())

    def test_priors_learned_again_are_the_priors_built_afresh(self):
        # What an answer does to the priors: a few rows and one model's replies change in place
        # (now and then a row or a model that is new), against priors built from the same figures.
        rng = random.Random(13)
        refreshed = 0
        for _ in range(300):
            priors, policies, models = random_priors(rng)
            learned, replies = priors.learned, dict(priors.replies)
            assert isinstance(learned, dict)
            for _ in range(15):
                keys = rng.sample(sorted(learned), min(len(learned), rng.randint(1, 3)))
                if rng.random() < 0.1 or not keys:
                    keys.append((rng.choice(policies), rng.choice(models + ["*"])))
                for key in keys:
                    learned[key] = random_stats(rng)
                if rng.random() < 0.05:  # a row changed elsewhere, not among the answer's (a reload)
                    learned[(rng.choice(policies), f"other{rng.randint(0, 9)}")] = random_stats(rng)
                model = rng.choice(models if rng.random() < 0.1 or not replies else sorted(replies))
                replies[model] = random_stats(rng)
                if priors.learned_again(keys, model, replies[model]):
                    refreshed += 1
                else:
                    priors = RatioPriors(learned, priors.default, replies, priors.default_replies)
                afresh = RatioPriors(learned, priors.default, replies, priors.default_replies)
                assert [(k, astuple(v)) for k, v in priors.by_policy.items()] == \
                    [(k, astuple(v)) for k, v in afresh.by_policy.items()]
                assert priors.replies == afresh.replies and priors.all_replies == afresh.all_replies
                weights = ("model_weight", "policy_weight", "pair_weight", "variant_weight")
                assert [getattr(priors, w) for w in weights] == [getattr(afresh, w) for w in weights]
                for policy in policies:
                    args = (policy, rng.choice(models + ["other1"]), frozenset(rng.choice([(), ("json",)])),
                            rng.choice([0, 14, 900]))
                    assert same_figures(priors.ratio(*args), afresh.ratio(*args)), args
        assert refreshed > 2000

    def test_pool_of_one_part(self):
        rng = random.Random(9)
        for _ in range(2000):
            part = random_stats(rng)
            total = sum([part.count])
            mean = sum([part.count * part.mean]) / total
            plain = RatioStats(mean, sum([part.count * (part.variance + (part.mean - mean) ** 2)]) / total, total)
            assert same_figures(pool([part]), plain)
            assert same_figures(pool([part, RatioStats(3.0, 1.0, 0)]), plain)  # a part without samples adds nothing

    def test_forecast_points_raised_or_capped_only_when_needed(self):
        rng = random.Random(10)
        for _ in range(5000):
            ratio = random_stats(rng)
            args = (rng.choice([0, 1, 3, 14, 1000, 50000]), ratio, rng.choice([None, 0, 1, 20, 300, 10 ** 6]))
            assert same_figures(forecast_output(*args), forecast_plainly(*args)), args

    def test_milli_tokens_rounds_as_decimal_quantize(self):
        rng = random.Random(11)
        # exact halves of a thousandth (k / 16) and figures around them, then arbitrary ones
        figures = [k / 16 for k in range(16, 4000)] + [math.nextafter(k / 16, 0) for k in range(16, 400)]
        figures += [math.nextafter(k / 16, math.inf) for k in range(16, 400)]
        figures += [rng.uniform(1, 1e7) for _ in range(20000)] + [1.0, 2.0 ** 40 + 0.5]
        for tokens in figures:
            assert milli_tokens(tokens) == int(Decimal(tokens).quantize(Decimal("0.001")).scaleb(3)), tokens


class TestProviderTrack:
    def test_a_kept_outlook_is_the_one_its_figures_make(self):
        # An outlook is kept, not made again, when a change leaves its figures as they were: after
        # every event it must equal one made from the record's figures afresh.
        assert 10.0 >= _OUTLOOK_REFRESH
        rng = random.Random(12)
        now = [0.0]
        track = ProviderTrack(overcharge_threshold=0.3, clock=lambda: now[0])
        kept = 0
        for _ in range(3000):
            provider = rng.choice(["a", "b"])
            event = rng.random()
            if event < 0.6:
                track.answered(provider)
            elif event < 0.7:
                track.failed(provider, charged=rng.random() < 0.5)
            elif event < 0.8:
                track.cache_reads(provider, 100, rng.choice([0, 0, 50]), rng.choice([None, 10]), Decimal(1))
            elif event < 0.9:
                track.charged(provider, ChargeCheck(rng.choice([100, 100, 150]), 100))
            else:
                # (time steps past the refresh interval: within it an outlook is kept as it was made)
                now[0] += rng.choice([10.0, 30.0, 3000.0])
            if provider not in track._records:
                continue
            before = track._records[provider].outlook
            outlook = track.outlook(provider)
            kept += outlook is before
            afresh = copy.deepcopy(track)
            afresh._records[provider].outlook = None
            assert outlook == afresh.outlook(provider)
            assert (outlook.input_factor, outlook.charge_factor) == (afresh.outlook(provider).input_factor,
                                                                     afresh.outlook(provider).charge_factor)
        assert kept > 20  # the kept ones were checked too

    def test_an_unknown_provider_is_assumed_reliable(self):
        outlook = ProviderTrack().outlook("new")
        assert outlook.success_rate == 1.0 and outlook.input_factor == 1 and outlook.failures_per_answer == 0

    def test_a_record_fades_back_to_the_priors_when_nothing_new_is_seen(self):
        now = [0.0]
        track = ProviderTrack(clock=lambda: now[0])
        for _ in range(3):
            track.failed("a", charged=True)
        fresh = track.outlook("a")
        failures = sum((1 - 1 / RELIABILITY_WINDOW) ** k for k in range(3))  # older ones fade per later attempt
        assert fresh.success_rate == pytest.approx(RELIABILITY_PRIOR / (failures + RELIABILITY_PRIOR))
        now[0] = RELIABILITY_HALF_LIFE  # half of it still counts
        assert track.outlook("a").success_rate == pytest.approx(RELIABILITY_PRIOR / (failures / 2 + RELIABILITY_PRIOR))
        assert track.outlook("a").charged_failure_share == pytest.approx((failures / 2 + 1) / (failures / 2 + 2))
        now[0] = 20 * RELIABILITY_HALF_LIFE  # passed over for hours: as good as new
        assert track.outlook("a").success_rate == pytest.approx(1.0, abs=1e-4)
        track.failed("a", charged=False)  # and a new failure counts in full against what is left
        assert track.outlook("a").success_rate == pytest.approx(RELIABILITY_PRIOR / (1 + RELIABILITY_PRIOR), rel=1e-3)

    def test_one_free_failure_does_not_make_failures_free(self):
        track = ProviderTrack()
        track.failed("a", charged=False)
        assert track.outlook("a").charged_failure_share == pytest.approx(1 / 3)
        track.failed("b", charged=True)
        assert track.outlook("b").charged_failure_share == pytest.approx(2 / 3)

    def test_success_rate_follows_recent_attempts(self):
        track = ProviderTrack()
        track.failed("a", charged=True)
        assert 0.5 < track.outlook("a").success_rate < 1.0  # the prior softens one early failure
        for i in range(400):
            track.answered("a") if i % 2 else track.failed("a", charged=i % 4 == 0)
        outlook = track.outlook("a")
        assert outlook.success_rate == pytest.approx(0.5, abs=0.05)
        assert outlook.charged_failure_share == pytest.approx(0.5, abs=0.1)
        for _ in range(300):
            track.answered("a")
        assert track.outlook("a").success_rate > 0.99

    def test_cache_reads_give_an_effective_input_price(self):
        track = ProviderTrack()
        for _ in range(10):
            # half the prompt from cache, at a tenth of the 2 msats/token input price
            track.cache_reads("a", 1000, 500, 100, Decimal(2))
        assert track.outlook("a").input_factor == Decimal("0.55")

    def test_cache_reads_without_a_reported_price_count_at_full_price(self):
        track = ProviderTrack()
        track.cache_reads("a", 1000, 800, None, Decimal(2))
        assert track.outlook("a").input_factor == 1


class TestCharges:
    def test_overcharges_are_counted_and_an_overcharger_demoted(self):
        track = ProviderTrack(overcharge_threshold=0.2, overcharge_action="demote")
        assert not track.charged("a", ChargeCheck(101, 100))  # one msat over: rounding
        assert track.charged("a", ChargeCheck(130, 100))
        assert track.charges("a") == ChargeTotals(checked=2, overcharged=1, overcharged_msats=30)
        assert track.standing("a") == "ok"  # too few checks to judge
        track.charged("a", ChargeCheck(130, 100))
        outlook = track.outlook("a")
        assert outlook.demoted and not outlook.excluded and track.standing("a") == "demoted"
        assert outlook.overcharging == "charged above its advertised prices on 2 of 3 checked requests"
        assert Decimal(1) < outlook.charge_factor < Decimal("1.3")

    def test_an_honest_record_wins_back_its_standing(self):
        track = ProviderTrack(overcharge_threshold=0.2, overcharge_action="exclude")
        for _ in range(3):
            track.charged("a", ChargeCheck(200, 100))
        assert track.outlook("a").excluded
        for _ in range(100):
            track.charged("a", ChargeCheck(100, 100))
        assert track.standing("a") == "ok"

    def test_action_none_only_reports(self):
        track = ProviderTrack(overcharge_threshold=0.0, overcharge_action="none")
        for _ in range(3):
            track.charged("a", ChargeCheck(200, 100))
        outlook = track.outlook("a")
        assert outlook.overcharging and not outlook.demoted and not outlook.excluded
        assert track.standing("a") == "overcharging"

    def test_an_undercharge_is_not_an_overcharge_and_does_not_lower_the_price(self):
        track = ProviderTrack()
        for _ in range(5):
            assert not track.charged("a", ChargeCheck(50, 100))
        assert track.outlook("a").charge_factor == 1 and track.standing("a") == "ok"
