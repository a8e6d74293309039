"""What budgets cost a request on the proxy's event loop, against the same requests without budgets.

Each request is decided, reserved (with budgets: one transaction on the ledger thread, awaited),
and settled into the ledger, as the proxy does. Printed per request: the event loop thread's own
CPU time (what other requests wait for) and the wall time (which includes waiting for the
ledger thread's reservation, time the loop spends serving other requests), sequentially and with
64 requests at once. Same run, same SQLite file setup, budgets off then on.
Run: .venv/bin/python bench/budgets.py [requests]
"""

from __future__ import annotations

import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from arbstr.config import parse_config  # noqa: E402
from arbstr.engine import Engine, Outcome  # noqa: E402
from arbstr.store import Ledger  # noqa: E402
from recording import CONFIG as PROVIDERS  # noqa: E402
from recording import USAGE  # noqa: E402

BUDGETS = """
[[budgets]]
name = "all-day"
limit_sats = 1000000000
window = "day"
[[budgets]]
name = "p0-hourly"
limit_sats = 1000000000
window = "1h"
provider = "p0"
[[budgets]]
name = "gpt-4o-month"
limit_sats = 1000000000
window = "month"
model = "gpt-4o"
"""
BODY = json.dumps({"model": "gpt-4o", "max_tokens": 200,
                   "messages": [{"role": "user", "content": "benchmark " * 50}]}).encode()


async def one_request(engine: Engine, i: int) -> None:
    """What the addon does for a request, without the network: decide, reserve, settle."""
    decision = engine.decide(str(i), BODY, None)
    budget = engine.budget(decision)
    await budget.admit(decision.plan.best)
    record = engine.settle(decision, Outcome(decision.plan.best.provider, 200, USAGE, None, time.monotonic()))
    budget.settle(record.cost_sats)


async def measure(engine: Engine, n: int, concurrency: int) -> tuple[float, float]:
    """(loop CPU µs, wall µs) per request."""
    cpu, wall = time.thread_time(), time.perf_counter()
    for start in range(0, n, concurrency):
        await asyncio.gather(*(one_request(engine, i) for i in range(start, min(n, start + concurrency))))
    return (time.thread_time() - cpu) / n * 1e6, (time.perf_counter() - wall) / n * 1e6


def run(with_budgets: bool, n: int, directory: Path) -> dict[str, tuple[float, float]]:
    config = parse_config(PROVIDERS + (BUDGETS if with_budgets else ""), environ={})
    ledger = Ledger(str(directory / f"{'budgets' if with_budgets else 'plain'}.db"))
    engine = Engine(config, ledger)
    results = {}
    try:
        asyncio.run(measure(engine, 500, 1))  # warm up
        for concurrency in (1, 64):
            results[f"{concurrency} at once"] = asyncio.run(measure(engine, n, concurrency))
        ledger.call(lambda: None)  # every settlement written
        if with_budgets:
            unsettled = ledger.call(lambda: ledger.db.execute_sql("SELECT COUNT(*) FROM budget_reservations").fetchone()[0])
            assert unsettled == 0, f"{unsettled} reservations left unsettled"
    finally:
        ledger.close()
    return results


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}; "
          f"{n} requests per row, 10 providers, 3 budgets applying to each request, SQLite file in WAL mode")
    with tempfile.TemporaryDirectory() as tmp:
        plain = run(False, n, Path(tmp))
        budgets = run(True, n, Path(tmp))
    print(f"{'':<14}{'LOOP CPU US':>12}{'':>4}{'WALL US':>10}   (per request; plain -> with budgets)")
    for row in plain:
        (cpu0, wall0), (cpu1, wall1) = plain[row], budgets[row]
        print(f"{row:<14}{cpu0:>7.1f} -> {cpu1:<7.1f}{wall0:>7.1f} -> {wall1:<7.1f}"
              f"  budgets add {cpu1 - cpu0:.1f} us of loop CPU ({cpu1 / cpu0:.2f}x), {wall1 - wall0:.1f} us wall")


if __name__ == "__main__":
    main()
