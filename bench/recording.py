"""What recording a request costs the proxy's event loop, against routing alone.

Prints per-request microseconds for: planning a route (the baseline), planning + settling a
request into the ledger (what the hot path does), and the ledger's own write rate off the loop.
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
from arbstr.store import Ledger, RequestRow  # noqa: E402
from arbstr.usage import UsageReport  # noqa: E402

CONFIG = "".join(
    f'[[providers]]\nname = "p{i}"\nurl = "https://p{i}.example"\napi_key = "sk-bench-{i:020d}"\n'
    f'models = ["gpt-4o"]\ninput_rate = {1 + i / 10}\noutput_rate = {4 - i / 10}\nbase_fee = 0.001\n'
    for i in range(10))
BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "benchmark " * 50}]}).encode()
USAGE = UsageReport(120, 60, 52, "", True)


def per_request_us(engine: Engine, n: int, settle: bool) -> float:
    started = time.perf_counter()
    for i in range(n):
        decision = engine.decide(str(i), BODY, None)
        if settle:
            engine.settle(decision, Outcome(decision.plan.best.provider, 200, USAGE, None, time.monotonic()))
    return (time.perf_counter() - started) / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    config = parse_config(CONFIG, environ={})
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(str(Path(tmp) / "bench.db"))
        engine = Engine(config, ledger)
        per_request_us(engine, 1000, True)  # warm up
        baseline = per_request_us(engine, n, settle=False)
        recording = per_request_us(engine, n, settle=True)
        started = time.perf_counter()
        ledger.call(lambda: None)  # waits until every queued row is written
        drained = time.perf_counter() - started
        written = ledger.call(lambda: RequestRow.select().count())
        ledger.close()
    print(f"{n} requests, 10 providers, SQLite file in WAL mode")
    print(f"{'route only (baseline)':<32}{baseline:>10.1f} us/request")
    print(f"{'route + settle + record':<32}{recording:>10.1f} us/request")
    print(f"{'recording adds on the loop':<32}{recording - baseline:>10.1f} us/request "
          f"({recording / baseline:.2f}x the baseline)")
    print(f"{'ledger backlog after the run':<32}{drained * 1000:>10.1f} ms to drain; {written} rows written")


if __name__ == "__main__":
    main()
