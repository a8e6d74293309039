"""The one place that turns tokens and rates into money.

Amounts are exact `Decimal` sats (a millisat is 0.001). The one rounding is the one Routstr nodes
bill with: a request's token cost is rounded up to a whole millisat. Rates are sats per 1000 tokens,
as in the config; Routstr's per-token `sats_pricing` converts with `rates_from_sats_per_token`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal

THOUSAND = Decimal(1000)
MSAT = Decimal("0.001")
OUTPUT_PLACES = 3
"""Expected output tokens are estimated to the thousandth of a token (see `estimate_msats`)."""
_EXACT_BELOW = 10 ** 18
"""Below this many (scaled) msats, Decimal's 28 digits hold every step of `estimate_cost` exactly
(with a fee of at most _FEE_DIGITS digits on either side of the point)."""
_FEE_DIGITS = 8


@dataclass(frozen=True, slots=True)
class Rates:
    """What a provider charges for one model."""

    input_per_1k: Decimal
    output_per_1k: Decimal
    per_request: Decimal = Decimal(0)
    """A flat fee added to every request's estimate: only one the provider really bills (see market.py
    for why a live node's advertised `request` fee is not one)."""
    output_float: float = field(init=False, repr=False, compare=False)
    """`output_per_1k` as a float, for figures that only rank (an estimate's spread)."""
    scaled: tuple[int, int, int, int, int] | None = field(init=False, repr=False, compare=False)
    """The rates and the fee as integers for `estimate_msats`: (input, output, divisor, fee numerator,
    fee denominator); None for the rare rates that need Decimal's own arithmetic."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_float", float(self.output_per_1k))
        object.__setattr__(self, "scaled", _scaled(self))


def _scaled(rates: Rates) -> tuple[int, int, int, int, int] | None:
    """Integers A, B, D with in × input + (out_milli / 1000) × output = (in × A + out_milli × B) / D
    exactly, and the fee as N / M; None when a rate is not a finite non-negative Decimal or the
    products would carry a positive exponent (where Decimal's result keeps one)."""
    parts = []
    for rate in (rates.input_per_1k, rates.output_per_1k, rates.per_request):
        if not isinstance(rate, Decimal) or not rate.is_finite() or rate < 0:
            return None
        sign, digits, exponent = rate.as_tuple()
        parts.append((int("".join(map(str, digits)) or "0"), exponent))
    (input_digits, input_exponent), (output_digits, output_exponent), (fee_digits, fee_exponent) = parts
    lowest = min(input_exponent, output_exponent - OUTPUT_PLACES)
    if lowest > 0 or fee_digits >= 10 ** _FEE_DIGITS or fee_exponent < -_FEE_DIGITS:
        return None
    fee_numerator, fee_denominator = (fee_digits * 10 ** fee_exponent, 1) if fee_exponent >= 0 \
        else (fee_digits, 10 ** -fee_exponent)
    return (input_digits * 10 ** (input_exponent - lowest), output_digits * 10 ** (output_exponent - OUTPUT_PLACES - lowest),
            10 ** -lowest, fee_numerator, fee_denominator)


def estimate_cost(rates: Rates, input_tokens: int | Decimal, output_tokens: int | Decimal) -> Decimal:
    """Sats for a request of this size, as a Routstr node bills it:
    `ceil(in × input_rate + out × output_rate)` msats (a rate per 1k tokens is msats per token) `+ per_request`."""
    msats = input_tokens * rates.input_per_1k + output_tokens * rates.output_per_1k
    return msats_cost(msats.to_integral_value(ROUND_CEILING), rates)


def msats_cost(msats: int | Decimal, rates: Rates) -> Decimal:
    """A token cost already rounded up to whole msats, as sats with the request fee added."""
    return Decimal(msats) / THOUSAND + rates.per_request


def estimate_msats(rates: Rates, input_tokens: int, output_milli: int) -> tuple[int, float] | None:
    """`estimate_cost` for a whole number of input tokens and `output_milli` thousandths of output
    tokens, in integers: (the token cost rounded up to whole msats, the whole cost in sats as the
    float nearest to it), the same figures `estimate_cost` and `float()` of it give, without making
    a Decimal (the router estimates every offer of a model for every request). None when only
    Decimal's arithmetic gives `estimate_cost`'s result (see `Rates.scaled`)."""
    scaled = rates.scaled
    if scaled is None or input_tokens < 0 or output_milli < 0:
        return None
    input_rate, output_rate, divisor, fee_numerator, fee_denominator = scaled
    total = input_tokens * input_rate + output_milli * output_rate
    if total >= _EXACT_BELOW:
        return None
    msats = -(-total // divisor)
    # int / int is the correctly rounded quotient, as float() of the exact Decimal is.
    return msats, (msats * fee_denominator + fee_numerator * 1000) / (1000 * fee_denominator)


def rates_from_sats_per_token(prompt: float | str, completion: float | str, request: float | str = 0) -> Rates:
    """Rates from Routstr's `sats_pricing` (sats per token, per request)."""
    def exact(v: float | str) -> Decimal:
        return Decimal(repr(v)) if isinstance(v, float) else Decimal(v)
    return Rates(exact(prompt) * THOUSAND, exact(completion) * THOUSAND, exact(request))


def msats_to_sats(msats: int | Decimal) -> Decimal:
    return Decimal(msats) * MSAT


def format_sats(amount: Decimal) -> str:
    """Sats for people: up to millisat precision, trailing zeros dropped (`0.052`, `12`)."""
    return exact_sats(amount.quantize(MSAT) if amount.as_tuple().exponent < -3 else amount)


def exact_sats(amount: Decimal) -> str:
    """Sats for machines: every digit there is, no exponent, no trailing zeros (`0.05251`, `12`)."""
    text = f"{amount:f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def actual_cost(rates: Rates, input_tokens: int, output_tokens: int, reported_msats: int | None) -> tuple[Decimal, bool]:
    """What a request cost: the provider's own exact figure when it gave one, else its rates applied
    to the tokens used. The flag says which."""
    if reported_msats is not None:
        return msats_to_sats(reported_msats), True
    return estimate_cost(rates, input_tokens, output_tokens), False


CHARGE_TOLERANCE_MSATS = 1
"""How far above the advertised price a charge may be and still be rounding: a node that adds its
per-part figures in floating point before rounding up can land one msat higher."""


@dataclass(frozen=True, slots=True)
class ChargeCheck:
    """A provider's reported charge beside what its advertised prices allow for the same tokens."""

    reported_msats: int
    advertised_msats: int

    @property
    def difference_msats(self) -> int:
        """Reported minus advertised: above zero the provider charged more than it advertised."""
        return self.reported_msats - self.advertised_msats

    @property
    def overcharged(self) -> bool:
        return self.difference_msats > CHARGE_TOLERANCE_MSATS


def advertised_charge_msats(rates: Rates, input_tokens: int, output_tokens: int,
                            advertised_fee: Decimal = Decimal(0)) -> int:
    """The most these tokens may be billed at the advertised rates, in whole msats: Routstr bills
    `ceil(in × prompt + out × completion)` msats (a rate in sats per 1k tokens is msats per token),
    plus the per-request fee: the one estimates count (`rates.per_request`) or the one the node
    advertises, whichever is more (real nodes do not bill the advertised one, but billing it is no
    overcharge)."""
    # Every answer's charge is checked: the integer arithmetic of `estimate_msats` (the same
    # figures) where it can, and the fee from `Rates.scaled` when it is the larger one.
    exact = estimate_msats(rates, input_tokens, output_tokens * 10 ** OUTPUT_PLACES) \
        if type(input_tokens) is int and type(output_tokens) is int else None
    tokens = exact[0] if exact is not None else math.ceil(input_tokens * rates.input_per_1k
                                                          + output_tokens * rates.output_per_1k)
    if rates.scaled is not None and not advertised_fee > rates.per_request:
        _, _, _, fee_numerator, fee_denominator = rates.scaled
        return tokens - (-fee_numerator * 1000 // fee_denominator)
    return tokens + math.ceil(max(rates.per_request, advertised_fee) * 1000)


def check_charge(rates: Rates, input_tokens: int, output_tokens: int, reported_msats: int,
                 advertised_fee: Decimal = Decimal(0)) -> ChargeCheck:
    return ChargeCheck(reported_msats, advertised_charge_msats(rates, input_tokens, output_tokens, advertised_fee))
