import math
import random
from decimal import Decimal

import pytest

from arbstr.pricing import (Rates, advertised_charge_msats, check_charge, estimate_cost, estimate_msats, format_sats,
                            msats_cost, msats_to_sats, rates_from_sats_per_token)


RATES = ["0", "1", "0.5", "3.03", "13.5", "0.0015", "2.125", "7.123456789", "1E+1", "3e2", "0.00000001", "1e-12",
         "12345678901234567890.5"]
EVERYDAY = {"0", "1", "0.5", "3.03", "13.5", "0.0015", "2.125", "7.123456789", "1E+1", "3e2", "0.001", "0.25"}
"""Rates and fees the integer estimate must take (it may leave the others to Decimal)."""


class TestEstimateMsats:
    """The router's integer estimate gives what estimate_cost (and float() of it) give, digit for digit."""

    @pytest.mark.parametrize("input_rate", RATES)
    @pytest.mark.parametrize("output_rate", RATES)
    @pytest.mark.parametrize("fee", ["0", "0.001", "1", "0.25", "1E+2", "0.000000001"])
    def test_same_figures_as_estimate_cost(self, input_rate, output_rate, fee):
        rates = Rates(Decimal(input_rate), Decimal(output_rate), Decimal(fee))
        for input_tokens, output in ((0, "0.000"), (1, "1.000"), (500, "86.100"), (123, "0.001"), (10**7, "4321.567"),
                                     (10**15, "99999999.999")):
            expected = estimate_cost(rates, input_tokens, Decimal(output))
            found = estimate_msats(rates, input_tokens, int(Decimal(output) * 1000))
            if found is None:  # figures so large or fine that only Decimal's own arithmetic gives its result
                assert not {input_rate, output_rate, fee} <= EVERYDAY or input_tokens >= 10**7
                continue
            msats, sats = found
            cost = msats_cost(msats, rates)
            assert (cost, cost.as_tuple()) == (expected, expected.as_tuple())
            assert sats == float(expected)

    def test_rates_with_only_positive_exponents_take_decimal_arithmetic(self):
        assert estimate_msats(Rates(Decimal("1E+1"), Decimal("1E+4")), 5, 1000) is None
        assert estimate_msats(Rates(Decimal("1E+1"), Decimal("1E+3")), 5, 1000) == (1050, 1.05)


class TestEstimateCost:
    def test_formula(self):
        rates = Rates(Decimal("3"), Decimal("12"), Decimal("1"))
        # (1000*3 + 500*12)/1000 + 1 = 3 + 6 + 1
        assert estimate_cost(rates, 1000, 500) == Decimal("10")

    def test_token_cost_rounds_up_to_whole_msats_like_a_node_bills(self):
        rates = Rates(Decimal("3.03"), Decimal("3.03"), Decimal("0.001"))
        # 17 tokens × 3.03 msats = 51.51 msats, billed as 52; plus the 1 msat fee
        assert estimate_cost(rates, 12, 5) == Decimal("0.053")

    def test_real_node_figure(self):
        # ROUTSTR.md: 0.00303 sats/token, 400 prompt + 407 completion tokens billed ceil(2445.21) = 2446 msats
        rates = rates_from_sats_per_token("0.00303", "0.00303")
        assert estimate_cost(rates, 400, 407) == Decimal("2.446")

    def test_a_whole_msat_is_not_rounded(self):
        assert estimate_cost(Rates(Decimal("1"), Decimal("2")), 3, 4) == Decimal("0.011")

    def test_many_small_costs_add_up_exactly(self):
        rates = Rates(Decimal("0.1"), Decimal("0.2"))
        total = sum(estimate_cost(rates, 10, 10) for _ in range(1000))
        assert total == Decimal("3")

    def test_zero_tokens_costs_the_fee(self):
        assert estimate_cost(Rates(Decimal(5), Decimal(5), Decimal("0.5")), 0, 0) == Decimal("0.5")


class TestConversions:
    def test_routstr_sats_per_token_become_per_1k(self):
        rates = rates_from_sats_per_token(0.00303, 0.0006, 0.001)
        assert rates == Rates(Decimal("3.03"), Decimal("0.6"), Decimal("0.001"))

    def test_msats(self):
        assert msats_to_sats(52) == Decimal("0.052")

    @pytest.mark.parametrize("amount,text", [
        (Decimal("0.052"), "0.052"), (Decimal("12"), "12"), (Decimal("12.500"), "12.5"),
        (Decimal("0.05251"), "0.053"), (Decimal("0"), "0"),
    ])
    def test_format(self, amount, text):
        assert format_sats(amount) == text


class TestChargeCheck:
    def test_integer_shortcut_same_as_decimal_arithmetic(self):
        # What every answer's check computes in integers where it can, against the formula in Decimals.
        rng = random.Random(3)
        figures = ["0", "1", "2", "0.5", "0.0015", "3.333", "12.34567", "1E+2", "0.000001", "7.1234567891", "150"]
        for _ in range(20000):
            rates = Rates(*(Decimal(rng.choice(figures)) for _ in range(3)))
            fee = Decimal(rng.choice(figures))
            tokens = rng.choice([0, 1, 12, 999, 10 ** 6, 10 ** 20]), rng.choice([0, 1, 30, 4096, 10 ** 19])
            plain = (math.ceil(tokens[0] * rates.input_per_1k + tokens[1] * rates.output_per_1k)
                     + math.ceil(max(rates.per_request, fee) * 1000))
            assert advertised_charge_msats(rates, *tokens, fee) == plain, (rates, tokens, fee)

    def test_routstr_bills_whole_msats_rounded_up(self):
        # 12 prompt tokens at 3.03 msats and 5 completion tokens at 3.03: 51.51 -> 52 msats
        rates = Rates(Decimal("3.03"), Decimal("3.03"))
        assert advertised_charge_msats(rates, 12, 5) == 52
        assert not check_charge(rates, 12, 5, 52).overcharged
        assert check_charge(rates, 12, 5, 50).difference_msats == -2

    def test_one_msat_over_is_rounding_more_is_an_overcharge(self):
        rates = Rates(Decimal("1"), Decimal("2"))
        assert not check_charge(rates, 100, 50, 201).overcharged
        check = check_charge(rates, 100, 50, 202)
        assert check.overcharged and check.difference_msats == 2

    def test_an_advertised_request_fee_may_be_charged(self):
        rates = Rates(Decimal("1"), Decimal("1"), Decimal("0.001"))
        assert advertised_charge_msats(rates, 10, 10) == 21
        assert not check_charge(rates, 10, 10, 21).overcharged

    def test_a_live_node_billing_the_fee_it_advertises_is_no_overcharger(self):
        # live offers leave the advertised fee out of estimates (v0.4.5 does not bill it), but a
        # node that does bill the fee it advertises charges what it said
        rates = Rates(Decimal("1"), Decimal("1"))
        assert not check_charge(rates, 10, 10, 20 + 500, advertised_fee=Decimal("0.5")).overcharged
        over = check_charge(rates, 10, 10, 20 + 503, advertised_fee=Decimal("0.5"))
        assert over.overcharged and over.difference_msats == 3
        assert check_charge(rates, 10, 10, 20 + 500).overcharged  # a fee it never advertised is one
