"""Instructions `arbstr serve` executes per request, counted by valgrind: a figure a shared machine cannot move.

req/s and CPU time per request swing by 20% and more between back-to-back runs when other work
shares the cores (bench/proxy.py --rounds takes medians for that). This counts instead what the
proxy process executes (all its threads: the event loop and the ledger writer), under callgrind,
for a fixed number of requests from bench/proxy.py's load generator (16 keep-alive connections,
the same non-streamed chat request, the same fake provider in its own process): back-to-back runs
agree to about 0.5%; under a different load on the machine counts move by up to 3% (the ledger
thread's batches and the event loop's grouping of ready events depend on timing), so compare
builds counted in the same run. The event loop's thread is also counted apart (callgrind
--separate-threads): it runs every request's path holding the GIL, so its figure is the one that
bounds req/s; the ledger thread's work per request is overstated here, since under callgrind a
batch gathers a request or two where a real run gathers dozens. Startup is not counted
(instrumentation starts once the proxy listens), nor are the warm-up requests. What it cannot see: time spent in the kernel (system calls) and how fast
the instructions run (cache misses), so it complements bench/proxy.py, it does not replace it.

`--baseline REV` also counts `arbstr serve` from the arbstr package of git revision REV (exported
with `git archive`, run by this venv's Python, as bench/proxy.py --baseline does) in the same run,
and prints the ratio. Needs valgrind (`apt-get install valgrind`); callgrind runs the proxy about
50 times slower, so a run of 1,000 requests takes about a minute per build.

Run:
  .venv/bin/python bench/instructions.py
  .venv/bin/python bench/instructions.py --baseline 1847435 [--requests 1000] [--warmup 200]
  .venv/bin/python bench/instructions.py --baseline 1847435 --baseline main   # several builds in one run
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy import (BASELINE_PREFIX, LISTENING, STREAM_CHUNK_DELAY, STREAM_REPLY, HttpConnection,  # noqa: E402
                   arbstr_config, chat_request, export_revision, print_machine, upstream)

START_TIMEOUT = 600.0
"""Seconds `arbstr serve` may take to start under callgrind."""
CONNECTIONS = 16


async def send(port: int, total: int) -> int:
    """`total` requests over CONNECTIONS keep-alive connections; how many did not answer 200."""
    request = chat_request(port, {}, stream=False)
    left, failed = total, 0

    async def worker() -> None:
        nonlocal left, failed
        connection = await HttpConnection.open(port)
        while left > 0:
            left -= 1
            response = await connection.exchange(request)
            failed += response.status != 200
            if connection.closed:
                connection = await HttpConnection.open(port)
        connection.close()

    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    return failed


def count(source: Path | None, upstream_port: int, workdir: Path, requests: int,
          warmup: int) -> tuple[float, float, int]:
    """(instructions per request in all, of them on the event loop's thread, failed requests) of
    `arbstr serve` from `source` (None: this tree)."""
    workdir.mkdir()
    (workdir / "config.toml").write_text(arbstr_config(upstream_port, workdir / "bench.db"))
    out = workdir / "callgrind.out"
    env = {**os.environ, "PYTHONPATH": str(source) if source else ""}
    # What `arbstr serve` execs itself into (python -O), started directly so valgrind follows it.
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
               f"--callgrind-out-file={out}",
               sys.executable, "-O", "-m", "arbstr.cli", "serve", "-c", str(workdir / "config.toml"),
               "--listen", "127.0.0.1:0"]
    log_path = workdir / "proxy.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (listening := LISTENING.search(log_path.read_text(errors="replace"))):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"arbstr serve did not start: {log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        port = int(listening.group(2))

        def control(*args: str) -> None:
            subprocess.run(["callgrind_control", *args, str(process.pid)], check=True, capture_output=True)

        control("--instr=on")
        failed = asyncio.run(send(port, warmup))
        control("--zero")
        failed += asyncio.run(send(port, requests))
        control("--dump")
        # One file a thread for this dump: `callgrind.out.1-01` (the main thread: the event loop), `-02`...
        dumps = sorted(glob.glob(f"{out}.1-*"))
        threads = [_total(Path(dump)) for dump in dumps]
        if not threads or dumps[0] != f"{out}.1-01":
            raise RuntimeError(f"callgrind wrote no dump of the main thread: {dumps}")
        return sum(threads) / requests, threads[0] / requests, failed
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _total(dump: Path) -> int:
    totals = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.M)
    if totals is None:
        raise RuntimeError(f"no totals in callgrind's dump {dump}")
    return int(totals.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--baseline", metavar="REV", action="append", default=[],
                        help="also count arbstr serve from git revision REV (repeatable)")
    parser.add_argument("--requests", type=int, default=1000, help="requests counted (default 1000)")
    parser.add_argument("--warmup", type=int, default=200, help="requests sent first, not counted (default 200)")
    args = parser.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        sys.exit("bench/instructions.py needs valgrind: apt-get install valgrind")
    print_machine(())
    print(f"{args.requests} requests counted after {args.warmup}, {CONNECTIONS} connections\n")
    figures = {}
    with tempfile.TemporaryDirectory(prefix="arbstr-bench-") as tmp, \
            upstream(STREAM_CHUNK_DELAY, STREAM_REPLY) as (upstream_port, _):
        builds: list[tuple[str, Path | None]] = [("arbstr", None)]
        for index, revision in enumerate(args.baseline):
            builds.append((f"{BASELINE_PREFIX}{revision}", export_revision(revision, Path(tmp) / f"rev{index}")))
        for name, source in builds:
            per_request, event_loop, failed = count(source, upstream_port, Path(tmp) / name.replace("@", "-"),
                                                    args.requests, args.warmup)
            figures[name] = per_request, event_loop
            note = f"  ({failed} requests failed)" if failed else ""
            print(f"{name:<20}{per_request / 1e6:8.3f} M instructions a request, {event_loop / 1e6:.3f} M of them "
                  f"on the event loop's thread{note}", flush=True)
    ours = figures["arbstr"]
    for revision in args.baseline:
        theirs = figures[f"{BASELINE_PREFIX}{revision}"]
        print(f"\narbstr / {BASELINE_PREFIX}{revision} instructions a request {ours[0] / theirs[0]:8.3f}")
        print(f"arbstr / {BASELINE_PREFIX}{revision} on the event loop's thread {ours[1] / theirs[1]:8.3f}")


if __name__ == "__main__":
    main()
