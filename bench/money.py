"""What arbstr's routing really spends, against an oracle, on a replayed mixed workload.

A workload of chat requests under four policies with different input/output shapes (long
documents summarised, short prompts written out at length, JSON extraction with tools, chat whose
long conversations answer shorter) goes to five providers of one model: two with opposite price
shapes (cheap input and dear output, and the reverse), a balanced one, a flaky one that is a
little cheaper than the balanced one but fails a third of the time (half of its failures are
timeouts it bills in full), and one that advertises the lowest prices but bills 1.5 times them.

Every request is replayed, from a cold start, through three routers:
- `oracle`: knows each request's true token counts and which provider would fail it, and pays the
  least any provider that answers would really bill;
- `arbstr`: the real `Engine` (decide, then settle with what the provider reported), trying its
  plan in order as the dispatcher does (a half-open breaker's one trial slot claimed first), every
  attempt reported to the health book as an exchange reports it, on a simulated clock (two seconds
  between requests);
- `advertised`: the same engine ranking by advertised rates at the policy's learned mean ratio,
  taking every provider at its word (today's seeds' router), with the same failover and breakers.
- `floor`: knows every policy's reply-length distribution, every provider's failure rate and
  billing from the first request, but not each request's draw: the best any router that cannot
  see the future can do (it still loses to the oracle where a reply is longer or shorter than
  usual, or the flaky provider would have answered).
Each pays what the providers really bill: answers, and the failures that are billed. It prints
total sats as multiples of the oracle's, the first 50 requests (the cold start) apart, and answers
lost; over several seeds, then their mean. Pure CPU, no network: the engine is the proxy's own.

Run: .venv/bin/python bench/money.py [--requests 400] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
from dataclasses import dataclass, field
from decimal import Decimal

from arbstr.config import Config
from arbstr.engine import Decision, Engine, Outcome
from arbstr.estimator import ANY_MODEL, Outlook, ProviderOutlook, RatioStats, RequestShape, forecast_output
from arbstr.pricing import Rates
from arbstr.exchange import Attempt, EndState, failures_of, report_health
from arbstr.usage import UsageReport

MODEL = "m"
COLD = 50
"""The first this many requests are the cold start, reported apart."""


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    input_rate: str
    """Advertised sats per 1k input tokens (= msats per token)."""
    output_rate: str
    fail_rate: float = 0.0
    billed_failures: float = 0.0
    """Of its failures, the share that are timeouts it bills in full; the rest are free 503s."""
    bills: float = 1.0
    """What it really bills, as a multiple of its advertised prices."""


PROVIDERS = (
    ProviderSpec("cheap-in", "0.5", "6"),
    ProviderSpec("cheap-out", "3", "1.5"),
    ProviderSpec("balanced", "1.5", "3"),
    ProviderSpec("flaky", "1.4", "2.8", fail_rate=0.33, billed_failures=0.5),
    ProviderSpec("cheat", "0.45", "5.4", bills=1.5),
)
"""Crossovers by output/input ratio r: below 1/3 cheap-in, 1/3 to 1 balanced, above 1 cheap-out;
cheat advertises a tenth below cheap-in and really costs half as much again."""


@dataclass(frozen=True)
class PolicySpec:
    name: str
    weight: float
    input_tokens: tuple[int, int]
    ratio: float
    """Mean output/input ratio of its requests."""
    spread: float
    """Standard deviation of the ratio as a multiple of its mean (lognormal)."""
    fields: dict = field(default_factory=dict)
    """Extra request fields: the signals the estimator reads."""
    long_ratio: float | None = None
    """Mean ratio of its long conversations (8 messages or more), asked a third of the time."""
    cap: float = 0.0
    """Share of its requests that send max_tokens (at about the typical reply length)."""


POLICIES = (
    PolicySpec("summarize", 0.3, (1500, 6000), ratio=0.08, spread=0.5),
    PolicySpec("write", 0.25, (40, 200), ratio=5.0, spread=0.6, cap=0.3),
    PolicySpec("extract", 0.2, (300, 1500), ratio=0.2, spread=0.4,
               fields={"response_format": {"type": "json_object"},
                       "tools": [{"type": "function", "function": {"name": "save"}}]}),
    PolicySpec("chat", 0.25, (100, 800), ratio=0.7, spread=0.5, long_ratio=0.15),
)


@dataclass
class Job:
    policy: str
    body: bytes
    true_input: int
    true_output: int
    fails: dict[str, EndState | None]
    """Per provider: None (it answers), HEADER_TIMEOUT (billed) or STATUS (a free 503)."""
    ratio: RatioStats
    """The distribution its reply was drawn from (the floor router knows it, arbstr must learn it)."""
    cap: int | None


def workload(count: int, rng: random.Random) -> list[Job]:
    jobs = []
    for _ in range(count):
        spec = rng.choices(POLICIES, [p.weight for p in POLICIES])[0]
        estimate = rng.randint(*spec.input_tokens)
        long = spec.long_ratio is not None and rng.random() < 1 / 3
        turns = 9 if long else 1
        # About four characters a token, as arbstr estimates; the provider's own count differs a little.
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * (estimate // turns * 4 // 5)}
                    for i in range(turns)]
        mean = spec.long_ratio if long else spec.ratio
        sigma2 = math.log1p(spec.spread ** 2)
        ratio = math.exp(rng.gauss(math.log(mean) - sigma2 / 2, math.sqrt(sigma2)))
        true_input = max(1, round(estimate * rng.uniform(0.95, 1.05)))
        output = max(1, round(true_input * ratio))
        fields = dict(spec.fields)
        if rng.random() < spec.cap:
            fields["max_tokens"] = max(1, round(true_input * spec.ratio))
            output = min(output, fields["max_tokens"])
        fails = {}
        for provider in PROVIDERS:
            failed = rng.random() < provider.fail_rate
            fails[provider.name] = None if not failed else \
                EndState.HEADER_TIMEOUT if rng.random() < provider.billed_failures else EndState.STATUS
        jobs.append(Job(spec.name, json.dumps({"model": MODEL, "messages": messages, **fields}).encode(),
                        true_input, output, fails, RatioStats(mean, (mean * spec.spread) ** 2, 1),
                        fields.get("max_tokens")))
    return jobs


def billed_msats(provider: ProviderSpec, input_tokens: int, output_tokens: int) -> int:
    """What the provider really bills for these tokens, in whole msats as Routstr rounds."""
    advertised = input_tokens * Decimal(provider.input_rate) + output_tokens * Decimal(provider.output_rate)
    return math.ceil(advertised * Decimal(repr(provider.bills)))


def config() -> Config:
    return Config.model_validate({
        "database": {"path": ":memory:"},
        "routing": {"health_interval": 0},
        "providers": [{"name": p.name, "url": f"http://{p.name}.invalid", "api_key": "sk-bench", "models": [MODEL],
                       "input_rate": Decimal(p.input_rate), "output_rate": Decimal(p.output_rate)}
                      for p in PROVIDERS],
        "policies": {"rules": [{"name": p.name} for p in POLICIES]},
    })


SEEDS_DEFAULT_RATIO = 1.0
"""The output/input ratio the seeds' router assumed until a policy had learned its own."""


class AdvertisedRatesEngine(Engine):
    """The seeds' router: advertised rates at the policy's learned mean ratio, every provider at its word."""

    def outlook(self, shape: RequestShape, providers: list[str]) -> Outlook:
        learned = self.learned.get((shape.policy, ANY_MODEL))
        mean = learned.mean if learned else SEEDS_DEFAULT_RATIO
        return Outlook(forecast_output(shape.input_tokens, RatioStats(mean, 0.0, 1), shape.max_output_tokens), {})


@dataclass
class Totals:
    msats: list[int] = field(default_factory=list)
    """What each request cost, answers and billed failures together."""
    lost: int = 0
    """Requests no provider answered."""
    plans: list[tuple[str, ...]] = field(default_factory=list)
    """Each request's providers in the order the router would try them."""

    def sats(self, part: slice = slice(None)) -> Decimal:
        return Decimal(sum(self.msats[part])) / 1000


class Clock:
    """Simulated time for the health book: breakers cool down between requests as they would live."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def replay(engine: Engine, jobs: list[Job]) -> Totals:
    """Each job through the engine's plan, as the dispatcher carries one out."""
    specs = {p.name: p for p in PROVIDERS}
    clock = Clock()
    engine.health.clock = engine.track.clock = clock
    totals = Totals()
    for number, job in enumerate(jobs):
        clock.now += 2.0
        decision: Decision = engine.decide(f"r{number}", job.body, job.policy)
        spent, tried = 0, []
        candidates = decision.plan.candidates
        totals.plans.append(tuple(c.provider for c in candidates))
        for index, candidate in enumerate(candidates):
            provider = specs[candidate.provider]
            last_chance = index == len(candidates) - 1 and all(a.state is EndState.SKIPPED for a in tried)
            if not engine.health.claim(provider.name, MODEL) and not last_chance:
                tried.append(Attempt(provider.name, EndState.SKIPPED))
                continue
            failure = job.fails[provider.name]
            if failure is None:
                attempt = Attempt(provider.name, EndState.OK, 200)
            elif failure is EndState.HEADER_TIMEOUT:
                attempt = Attempt(provider.name, failure, None, "no response headers within 60 s")
                spent += billed_msats(provider, job.true_input, job.true_output)
            else:
                attempt = Attempt(provider.name, failure, 503, "HTTP 503 upstream_error")
            report_health(engine.health, attempt, MODEL)
            if failure is None:
                charge = billed_msats(provider, job.true_input, job.true_output)
                spent += charge
                engine.settle(decision, Outcome(provider.name, 200,
                                                UsageReport(job.true_input, job.true_output, charge, "", True),
                                                None, decision.started, failures=failures_of(tried)))
                break
            tried.append(attempt)
        else:
            totals.lost += 1
            engine.settle(decision, Outcome(None, 502, None, None, decision.started, error="upstream_error",
                                            failures=failures_of(tried)))
        totals.msats.append(spent)
    return totals


def floor(jobs: list[Job]) -> Totals:
    """The best a router can do without seeing the future: it knows every reply-length distribution,
    failure rate and billing factor from the first request, not each request's draw."""
    totals = Totals()
    for job in jobs:
        forecast = forecast_output(job.true_input, job.ratio, job.cap)
        outlooks = {p.name: ProviderOutlook(1 - p.fail_rate, p.billed_failures, charge_factor=Decimal(repr(p.bills)))
                    for p in PROVIDERS}
        outlook = Outlook(forecast, outlooks)
        order = sorted(PROVIDERS, key=lambda p: outlook.estimate(
            p.name, Rates(Decimal(p.input_rate), Decimal(p.output_rate)), job.true_input).score)
        totals.plans.append(tuple(p.name for p in order))
        spent = 0
        for provider in order:
            failure = job.fails[provider.name]
            if failure is EndState.HEADER_TIMEOUT:
                spent += billed_msats(provider, job.true_input, job.true_output)
            elif failure is None:
                spent += billed_msats(provider, job.true_input, job.true_output)
                break
        else:
            totals.lost += 1
        totals.msats.append(spent)
    return totals


def expected_msats(plan: tuple[str, ...], job: Job) -> float:
    """What trying the providers in this order costs on average over the job's reply-length
    distribution and every provider's failures: a plan's quality, without the luck of the draw."""
    specs = {p.name: p for p in PROVIDERS}
    output = forecast_output(job.true_input, job.ratio, job.cap).mean
    total, reached = 0.0, 1.0
    for provider in map(specs.__getitem__, plan):
        cost = (job.true_input * float(provider.input_rate) + output * float(provider.output_rate)) * provider.bills
        total += reached * (1 - provider.fail_rate * (1 - provider.billed_failures)) * cost
        reached *= provider.fail_rate
    return total


CAUSES = ("an overcharger first", "an unreliable provider first", "another provider first", "the same first")
"""Why a plan expected to cost more than the floor's does, by what it tries first: a provider that
bills above its prices (before its charges are checked, nothing tells it apart), one that fails
(until its failures show), another (the reply length misjudged), or the floor's own first choice
(only the fallbacks differ)."""


def explain(jobs: list[Job], ours: Totals, bound: Totals, extra: dict[str, list[float]]) -> None:
    """Add to `extra` the expected cost above the floor's of each request's plan, by cause, the
    first COLD requests apart (`cold: cause`, `warm`), and the floor's own expected costs."""
    specs = {p.name: p for p in PROVIDERS}
    for number, (job, plan, best) in enumerate(zip(jobs, ours.plans, bound.plans)):
        more = expected_msats(plan, job) - expected_msats(best, job)
        first = specs[plan[0]]
        cause = CAUSES[3] if plan[0] == best[0] else CAUSES[0] if first.bills > 1 \
            else CAUSES[1] if first.fail_rate > 0 else CAUSES[2]
        part = "cold" if number < COLD else "warm"
        extra.setdefault(f"{part}: {cause}" if part == "cold" else part, []).append(more)
        extra.setdefault(f"{part} floor", []).append(expected_msats(best, job))


def oracle(jobs: list[Job]) -> Totals:
    """The least any provider that answers would really bill, knowing every count and outcome."""
    totals = Totals()
    for job in jobs:
        answers = [billed_msats(p, job.true_input, job.true_output) for p in PROVIDERS if job.fails[p.name] is None]
        totals.msats.append(min(answers, default=0))
        totals.lost += not answers
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--explain", action="store_true",
                        help="also say where arbstr's extra cost goes: each plan's expected cost against the floor's")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the engine logs each replay's overcharges: not what is measured
    print(f"{args.requests} requests a run, from a cold start; providers: "
          + ", ".join(f"{p.name} {p.input_rate}/{p.output_rate}" for p in PROVIDERS) + " sats per 1k in/out\n")
    header = ("SEED", "ORACLE SATS", "FLOOR/ORACLE", "ARBSTR/ORACLE", f"FIRST {COLD}", "AFTER",
              "ADVERTISED/ORACLE", f"FIRST {COLD}", "LOST O/F/A/ADV")
    rows = [header]
    ratios: list[list[float]] = []
    cold, warm = slice(0, COLD), slice(COLD, None)
    extra: dict[str, list[float]] = {}
    for seed in range(1, args.seeds + 1):
        jobs = workload(args.requests, random.Random(seed))
        best, bound = oracle(jobs), floor(jobs)
        ours, naive = replay(Engine(config()), jobs), replay(AdvertisedRatesEngine(config()), jobs)
        if args.explain:
            explain(jobs, ours, bound, extra)

        def ratio(totals: Totals, part: slice = slice(None)) -> float:
            return float(totals.sats(part) / best.sats(part))
        ratios.append([ratio(bound), ratio(ours), ratio(ours, cold), ratio(ours, warm), ratio(naive),
                       ratio(bound, cold), ratio(bound, warm)])
        rows.append((str(seed), f"{best.sats():.1f}", f"{ratio(bound):.4f}", f"{ratio(ours):.4f}",
                     f"{ratio(ours, cold):.3f}", f"{ratio(ours, warm):.4f}", f"{ratio(naive):.4f}",
                     f"{ratio(naive, cold):.3f}", f"{best.lost}/{bound.lost}/{ours.lost}/{naive.lost}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    bound, ours, ours_cold, ours_warm, naive, bound_cold, bound_warm = (sum(column) / len(ratios)
                                                                       for column in zip(*ratios))
    print(f"\nmean over {len(ratios)} seeds, as a multiple of the oracle's cost: arbstr {ours:.4f} "
          f"({(ours - 1) * 100:+.2f}%; first {COLD} requests {ours_cold:.3f}, the rest {ours_warm:.4f}), "
          f"advertised rates alone {naive:.4f} ({(naive - 1) * 100:+.2f}%), "
          f"floor {bound:.4f} ({(bound - 1) * 100:+.2f}%; first {COLD} {bound_cold:.3f}, the rest {bound_warm:.4f})")
    if args.explain:
        print(f"\nexpected cost of arbstr's plans above the floor's (over each request's reply-length "
              f"distribution and the providers' failures, so without the luck of the draw), as a share of "
              f"the floor's expected cost, all seeds:")
        for part in ("cold", "warm"):
            floor_msats = sum(extra[f"{part} floor"])
            causes = [key for key in extra if key.startswith(f"{part}") and not key.endswith("floor")]
            total = sum(sum(extra[key]) for key in causes)
            print(f"  {'first ' + str(COLD) if part == 'cold' else 'the rest'}: {total / floor_msats * 100:+.2f}%"
                  + "".join(f"; {key.split(': ')[1]} {sum(extra[key]) / floor_msats * 100:+.2f}% "
                            f"({sum(1 for x in extra[key] if x > 0.5)} requests)"
                            for key in causes if ": " in key))


if __name__ == "__main__":
    main()
