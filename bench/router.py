"""How fast `arbstr.router.plan_route` orders providers, as the provider list grows.

For 10, 100 and 1,000 providers that each offer the same 50 models (at different prices), prints
plans per second and microseconds per plan for: the default policy (every provider is a
candidate), a policy with price caps (about half the providers excluded, each with a reason
written out), and the default policy with a tenth of the providers deferred as unavailable (open
breakers). Each request asks for the next of the 50 models, with the estimator's outlook (a reply
length with spread, and a record for every provider, some of them flaky) built once per request,
as the engine does. Pure CPU, one core, no I/O: timed by this process's CPU clock, so other work on a
shared machine slows the run, not the figures.

Then, at 100 providers × 50 models, the same default plans with per-model prices (every provider
prices each model differently, as live Routstr nodes do) against single-rate providers (one rate
for all of a provider's models, as a config with one `input_rate`/`output_rate` makes), measured
in the same run: the ratio says what per-model offers cost the router.

Run: .venv/bin/python bench/router.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path

from arbstr.estimator import Outlook, ProviderTrack, RatioStats, forecast_output
from arbstr.policy import Policy
from arbstr.pricing import Rates
from arbstr.router import Catalogue, ProviderOffer, RouteRequest, plan_route

PROVIDER_COUNTS = (10, 100, 1000)
MODELS = tuple(f"model-{m:02d}" for m in range(50))
INPUT_TOKENS = 500
DEFAULT = Policy("default", "cheapest")
CAPPED = Policy("capped", "cheapest", max_sats_per_1k_output=Decimal(14), max_sats_per_request=Decimal(7))


def catalogue(providers: int, per_model: bool = True) -> Catalogue:
    """`providers` providers × every model; prices spread so that orders and caps really differ.
    `per_model=False`: each provider charges its model-0 price for every model."""
    return Catalogue(
        ProviderOffer(f"p{p:04d}", model,
                      Rates(Decimal(1 + (p * 7 + price) % 13) / 2, Decimal(2 + (p * 11 + price * 3) % 17),
                            Decimal((p + price) % 3) / 1000), rank=p)
        for p in range(providers) for m, model in enumerate(MODELS) for price in [m if per_model else 0])


def records(providers: int) -> ProviderTrack:
    """A record for every provider: one in seven fails a third of the time, some of it billed."""
    track = ProviderTrack()
    for p in range(providers):
        for attempt in range(30):
            if p % 7 == 0 and attempt % 3 == 0:
                track.failed(f"p{p:04d}", charged=attempt % 2 == 0)
            else:
                track.answered(f"p{p:04d}")
    return track


def planner(offers: Catalogue, policy: Policy, track: ProviderTrack,
            unavailable: Mapping[str, str] | None = None) -> Callable[[RouteRequest], object]:
    ratio = RatioStats(0.8, 0.3, 40)

    def plan(request: RouteRequest) -> object:
        names = [o.provider for o in offers.by_model[request.model]]
        outlook = Outlook(forecast_output(request.input_tokens, ratio, None), track.outlooks(names),
                          0.05)
        return plan_route(request, offers, policy, outlook, unavailable)
    return plan


def plans_per_second(plan: Callable[[RouteRequest], object], seconds: float) -> float:
    """Plan round-robin over the models for about `seconds` of this process's CPU time; plans per
    CPU second (so what else runs on a shared machine does not count)."""
    requests = [RouteRequest(model, INPUT_TOKENS) for model in MODELS]
    done, started = 0, time.process_time()
    while (elapsed := time.process_time() - started) < seconds:
        for request in requests:
            plan(request)
        done += len(requests)
    return done / elapsed


def measure(providers: int, seconds: float) -> list[str]:
    offers = catalogue(providers)
    unavailable: Mapping[str, str] = {f"p{p:04d}": "breaker open" for p in range(0, providers, 10)}
    track = records(providers)
    cases = [planner(offers, DEFAULT, track), planner(offers, CAPPED, track),
             planner(offers, DEFAULT, track, unavailable)]
    capped = cases[1]
    excluded = sum(len(capped(RouteRequest(model, INPUT_TOKENS)).exclusions) for model in MODELS)
    cells = [f"{providers:,}", f"{providers * len(MODELS):,}", f"{excluded / (providers * len(MODELS)):.0%}"]
    for case in cases:
        rate = plans_per_second(case, seconds)
        cells += [f"{rate:,.0f}", f"{1e6 / rate:,.1f}"]
    return cells


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement (default 1)")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"machine: {os.cpu_count()} CPUs, {cpu}; python {platform.python_version()}, "
          f"arbstr {importlib.metadata.version('arbstr')}")
    print(f"{len(MODELS)} models, {INPUT_TOKENS} input tokens a request, {args.seconds:g} s a cell\n")
    header = ["PROVIDERS", "OFFERS", "CAPPED OUT", "DEFAULT PLANS/S", "US", "CAPPED PLANS/S", "US",
              "10% DOWN PLANS/S", "US"]
    print_table([header] + [measure(providers, args.seconds) for providers in PROVIDER_COUNTS])
    print()
    planners = {"single-rate": planner(catalogue(100, per_model=False), DEFAULT, records(100)),
                "per-model": planner(catalogue(100), DEFAULT, records(100))}
    rates: dict[str, float] = {}
    for _ in range(3):  # interleaved, best of three, so a busy moment does not favour one side
        for label, plan in planners.items():
            rates[label] = max(rates.get(label, 0.0), plans_per_second(plan, args.seconds))
    print_table([["100 PROVIDERS × 50 MODELS", "PLANS/S", "US"]]
                + [[label, f"{rate:,.0f}", f"{1e6 / rate:,.1f}"] for label, rate in rates.items()])
    print(f"per-model / single-rate: {rates['per-model'] / rates['single-rate']:.2f}")


if __name__ == "__main__":
    main()
