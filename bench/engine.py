"""What routing and settling cost a request on the event loop: `Engine.decide` then `Engine.settle`, in process.

bench/proxy.py's setup without the network: its config (one provider, one model, recording into a
SQLite ledger in a temp dir, whose writer thread runs beside the loop as in `arbstr serve`), its
non-streamed chat request, and an answer carrying usage and the cost the provider's prices give
(a few output-token counts in turn, so the estimator keeps learning). Each build runs in a child
process: microseconds a request in decide, in settle and in both, medians over rounds taken in
turn with every build, so that other work on the machine weighs on each alike.

`--baseline REV` also runs the arbstr package of git revision REV (exported with `git archive`,
as bench/proxy.py --baseline does) and prints the ratios. `--instructions` counts instead what the
loop executes under callgrind (the difference between two runs of different lengths, so startup
and warm-up cancel out), the ledger's writer thread included: a figure other work on the machine
barely moves (runs differ by about 2%, with how the writer's batches fall). Needs valgrind.

Run:
  .venv/bin/python bench/engine.py [--baseline REV] [--requests 20000] [--rounds 5] [--instructions]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy import (BASELINE_PREFIX, MODEL, PROMPT, PROVIDER, ROOT, arbstr_config, export_revision,  # noqa: E402
                   print_machine)

WARMUP = 1000
INPUT_TOKENS = 12
OUTPUT_TOKENS = (30, 31, 33, 36, 40, 45, 51)
"""The answers' output tokens, in turn (the fake node's input rate is 1 msat a token, its output rate 2)."""
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}).encode()
COLLECTED = re.compile(r"Collected : (\d+)")


def child(requests: int) -> None:
    """Runs in the build's own process: WARMUP requests, then `requests` timed ones; prints the figures."""
    from arbstr.config import parse_config
    from arbstr.engine import Engine, Outcome
    from arbstr.store import Ledger
    from arbstr.usage import UsageReport

    with tempfile.TemporaryDirectory(prefix="arbstr-bench-") as tmp:
        config = parse_config(arbstr_config(9, Path(tmp) / "bench.db"))
        ledger = Ledger(config.database.path)
        engine = Engine(config, ledger)
        clock = time.perf_counter
        deciding = settling = 0.0
        for i in range(-WARMUP, requests):
            output = OUTPUT_TOKENS[i % len(OUTPUT_TOKENS)]
            usage = UsageReport(INPUT_TOKENS, output, INPUT_TOKENS + 2 * output, "", True)
            started = clock()
            decision = engine.decide(str(i), BODY, None)
            decided = clock()
            outcome = Outcome(PROVIDER, 200, usage, None, time.monotonic())
            settle_started = clock()
            engine.settle(decision, outcome)
            if i >= 0:
                deciding += decided - started
                settling += clock() - settle_started
        ledger.close()
    print(json.dumps({"decide": deciding / requests * 1e6, "settle": settling / requests * 1e6}))


def run(source: Path | None, requests: int, valgrind: bool = False) -> dict[str, float] | int:
    """The child's figures (or, under callgrind, the instructions it executed) for one build."""
    env = {**os.environ, "PYTHONPATH": str(source or ROOT), "PYTHONHASHSEED": "0"}
    command = [sys.executable, __file__, "--child", str(requests)]
    if valgrind:
        command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}: {done.stderr[-2000:]}")
    if valgrind:
        collected = COLLECTED.search(done.stderr)
        if collected is None:
            raise RuntimeError(f"no instruction count from callgrind: {done.stderr[-2000:]}")
        return int(collected.group(1))
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--baseline", metavar="REV", help="also run the engine of git revision REV")
    parser.add_argument("--requests", type=int, default=20000, help="timed requests a round (default 20000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each build in turn (default 5)")
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind instead")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    if args.instructions and not shutil.which("valgrind"):
        sys.exit("--instructions needs valgrind: apt-get install valgrind")
    print_machine(())
    with tempfile.TemporaryDirectory(prefix="arbstr-bench-") as tmp:
        builds: list[tuple[str, Path | None]] = [("arbstr", None)]
        if args.baseline:
            builds.append((f"{BASELINE_PREFIX}{args.baseline}", export_revision(args.baseline, Path(tmp))))
        if args.instructions:
            short, long = 1000, 3000
            print(f"instructions a request: ({long} requests - {short} requests) / {long - short}, "
                  f"after {WARMUP} unmeasured\n")
            totals = {}
            for name, source in builds:
                count = run(source, long, valgrind=True), run(source, short, valgrind=True)
                totals[name] = (count[0] - count[1]) / (long - short)
                print(f"{name:<20}{totals[name] / 1000:8.1f} k instructions a decide + settle", flush=True)
            if args.baseline:
                print(f"\narbstr / {builds[1][0]} instructions {totals['arbstr'] / totals[builds[1][0]]:8.3f}")
            return
        print(f"{args.requests} requests a round after {WARMUP} unmeasured, {args.rounds} rounds (medians)\n")
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name, _ in builds}
        for _ in range(args.rounds):
            for name, source in builds:
                figures = run(source, args.requests)
                assert isinstance(figures, dict)
                rounds[name].append(figures)
    print(f"{'BUILD':<20}{'DECIDE US':>10}{'SETTLE US':>11}{'TOTAL US':>10}")
    medians = {}
    for name, figures in rounds.items():
        decide = statistics.median(f["decide"] for f in figures)
        settle = statistics.median(f["settle"] for f in figures)
        total = medians[name] = statistics.median(f["decide"] + f["settle"] for f in figures)
        print(f"{name:<20}{decide:>10.1f}{settle:>11.1f}{total:>10.1f}")
    if args.baseline:
        baseline = builds[1][0]
        print(f"\narbstr / {baseline} decide + settle time {medians['arbstr'] / medians[baseline]:8.3f}")


if __name__ == "__main__":
    main()
