"""What recording a request costs the proxy's event loop, against routing alone.

Prints per-request microseconds for: planning a route (the baseline), planning + settling a
request into the ledger without metrics, the same with the Prometheus metrics (what the hot path
does), and the ledger's own write rate off the loop. Recording metrics must cost the loop less
than recording the ledger row does.
Then the ledger's flush_interval: the default (0.05 s, rows gather into one transaction) against
0 (each batch committed as soon as it arrives, for users who want a kill -9 to lose nothing):
per-request cost on the loop, transactions committed, and how long the backlog took to drain.
Run: .venv/bin/python bench/recording.py [requests]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arbstr.config import parse_config  # noqa: E402
from arbstr.engine import Engine, Outcome  # noqa: E402
from arbstr.metrics import Metrics  # noqa: E402
from arbstr.store import Ledger, RequestRow  # noqa: E402
from arbstr.usage import UsageReport  # noqa: E402

CONFIG = "".join(
    f'[[providers]]\nname = "p{i}"\nurl = "https://p{i}.example"\napi_key = "sk-bench-{i:020d}"\n'
    f'models = ["gpt-4o"]\ninput_rate = {1 + i / 10}\noutput_rate = {4 - i / 10}\nbase_fee = 0.001\n'
    for i in range(10))
BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "benchmark " * 50}]}).encode()
USAGE = UsageReport(120, 60, 52, "", True)
FLUSH_INTERVALS = (0.05, 0.0)
FAILURES = (("p3", "refused"),)
ROUNDS = 5


class Unmeasured(Metrics):
    """The engine as it was before metrics: settle records the row and nothing else."""

    def observe(self, record, failures=()) -> None:
        pass


def per_request_us(engine: Engine, n: int, settle: bool) -> float:
    started = time.perf_counter()
    for i in range(n):
        decision = engine.decide(str(i), BODY, None)
        if settle:
            engine.settle(decision, Outcome(decision.plan.best.provider, 200, USAGE, None, time.monotonic(),
                                            failures=FAILURES if i % 10 == 0 else ()))
    return (time.perf_counter() - started) / n * 1e6


def with_flush_interval(config, n: int, flush_interval: float, tmp: str) -> tuple[float, int, float, int]:
    """(us per request on the loop, transactions committed, ms to drain the backlog, rows written)."""
    ledger = Ledger(str(Path(tmp) / f"bench-{flush_interval}.db"), flush_interval)
    engine = Engine(config, ledger)
    per_request_us(engine, 1000, True)  # warm up
    ledger.call(lambda: None)
    transactions = 0
    write = ledger._write

    def counted(*args, **kwargs):
        nonlocal transactions
        transactions += 1
        return write(*args, **kwargs)

    ledger._write = counted
    cost = per_request_us(engine, n, settle=True)
    started = time.perf_counter()
    ledger.call(lambda: None)  # waits until every queued row is written
    drained = time.perf_counter() - started
    written = ledger.call(lambda: RequestRow.select().count())
    ledger.close()
    return cost, transactions, drained * 1000, written


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    config = parse_config(CONFIG, environ={})
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(str(Path(tmp) / "bench.db"))
        engine = Engine(config, ledger)
        bare = Engine(config, ledger, Unmeasured())
        per_request_us(engine, 1000, True)  # warm up
        per_request_us(bare, 1000, True)
        # Interleaved rounds, best of each: the machine is shared, and a burst of load in one
        # round must not land on one configuration only.
        rounds = [(per_request_us(engine, n // ROUNDS, settle=False), per_request_us(bare, n // ROUNDS, settle=True),
                   per_request_us(engine, n // ROUNDS, settle=True)) for _ in range(ROUNDS)]
        baseline, unmeasured, recording = (min(r[i] for r in rounds) for i in range(3))
        started = time.perf_counter()
        ledger.call(lambda: None)  # waits until every queued row is written
        drained = time.perf_counter() - started
        written = ledger.call(lambda: RequestRow.select().count())
        ledger.close()
    print(f"{n} requests, 10 providers, SQLite file in WAL mode")
    print(f"{'route only (baseline)':<32}{baseline:>10.1f} us/request")
    print(f"{'route + settle + record':<32}{unmeasured:>10.1f} us/request (no metrics)")
    print(f"{'route + settle + record + metrics':<32}{recording:>10.1f} us/request")
    print(f"{'recording adds on the loop':<32}{recording - baseline:>10.1f} us/request "
          f"({recording / baseline:.2f}x the baseline)")
    ledger_cost, metrics_cost = unmeasured - baseline, recording - unmeasured
    print(f"{'  of which the ledger row':<32}{ledger_cost:>10.1f} us/request")
    print(f"{'  of which the metrics':<32}{metrics_cost:>10.1f} us/request "
          f"({metrics_cost / ledger_cost:.2f}x the ledger row)")
    print(f"{'ledger backlog after the run':<32}{drained * 1000:>10.1f} ms to drain; {written} rows written")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {interval: with_flush_interval(config, n, interval, tmp) for interval in FLUSH_INTERVALS}
    for interval, (cost, transactions, drained, written) in runs.items():
        label = f"flush_interval {interval:g}"
        print(f"{label:<32}{cost:>10.1f} us/request with metrics ({cost / baseline:.2f}x the baseline); "
              f"{transactions} transactions, {n / max(transactions, 1):.0f} rows each; "
              f"backlog drained in {drained:.1f} ms; {written} rows")


if __name__ == "__main__":
    main()
