from decimal import Decimal

import pytest

from arbstr.pricing import Rates, estimate_cost, format_sats, msats_to_sats, rates_from_sats_per_token


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
