"""What paying from the wallet costs a request, against a key funded by hand, measured in one run.

One run starts a real Cashu mint (nutshell, FakeWallet; `make test-deps` makes its venv) and one
fake Routstr node paid in real ecash (`arbstr.testing.cashunode.CashuNode`, streams paced
STREAM_CHUNK_DELAY apart), then `arbstr serve` three times in front of it, once per `payment`:

  key      a key made at the node from a wallet token beforehand, written in the config
  wallet   arbstr makes and funds the key itself from the wallet (first request), then uses it
  xcashu   a wallet token with every request, its change taken from the X-Cashu response header

Columns: sequential non-streaming requests per second on one connection and their p50 latency,
p50 time to the first body byte of a `"stream": true` request, and the same as a ratio of the
key row. `wallet` after funding should cost nothing measurable per request; `xcashu` costs mint
round trips (its token is split and the node redeems it and mints the change) and, on today's
nodes, a stream that arrives all at once (TTFB = the whole answer).

Run:
  .venv/bin/python bench/wallet.py              # about a minute on 2 cores
  .venv/bin/python bench/wallet.py --requests 100 --streams 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arbstr.mock import MockModel  # noqa: E402
from arbstr.store import Ledger  # noqa: E402
from arbstr.testing.cashunode import CashuNode  # noqa: E402
from arbstr.testing.mint import TestMint  # noqa: E402
from arbstr.wallet import Wallet  # noqa: E402

MODEL = "gpt-4o"
STREAM_CHUNK_DELAY = 0.01
REPLY = " ".join(f"w{i}" for i in range(30))
LISTENING = re.compile(r"listening at (?:http://)?[0-9.]+:(\d+)")


def funded_wallet(db: str, mint: str, sats: int) -> None:
    async def go() -> None:
        ledger = Ledger(db, 0)
        try:
            wallet = Wallet(ledger, [mint])
            op, _ = await wallet.request_topup(sats)
            await wallet.finish_topup(op)
        finally:
            ledger.close()
    asyncio.run(go())


def key_from_wallet(db: str, mint: str, node: CashuNode, sats: int) -> str:
    async def go() -> str:
        from arbstr.funding import fund_key
        ledger = Ledger(db, 0)
        try:
            return await fund_key(Wallet(ledger, [mint]), "hand", node.url, sats)
        finally:
            ledger.close()
    return asyncio.run(go())


def start_serve(config: Path, workdir: Path) -> tuple[subprocess.Popen, int]:
    log = open(workdir / "serve.log", "wb")
    process = subprocess.Popen([str(Path(sys.executable).parent / "arbstr"), "serve", "-c", str(config),
                                "--listen", "127.0.0.1:0", "--confdir", str(workdir / "mitmproxy")],
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if found := LISTENING.search((workdir / "serve.log").read_text(errors="replace")):
            return process, int(found.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise RuntimeError((workdir / "serve.log").read_text(errors="replace")[-2000:])


def measure(port: int, requests: int, streams: int) -> tuple[float, float, float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "bench"}]}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for _ in range(3):  # warm up: the first wallet request makes and funds the key
            client.post("/v1/chat/completions", json=body)
        latencies = []
        started = time.perf_counter()
        for _ in range(requests):
            t0 = time.perf_counter()
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            latencies.append(time.perf_counter() - t0)
        rate = requests / (time.perf_counter() - started)
        ttfb = []
        for _ in range(streams):
            t0 = time.perf_counter()
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                first = True
                for _ in response.iter_raw():
                    if first:
                        ttfb.append(time.perf_counter() - t0)
                        first = False
    return rate, statistics.median(latencies) * 1000, statistics.median(ttfb) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--streams", type=int, default=10)
    args = parser.parse_args()
    print(f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}")
    rows = {}
    with TestMint() as mint, tempfile.TemporaryDirectory(prefix="arbstr-bench-wallet-") as tmp:
        node = CashuNode("node", [MockModel(MODEL, 0.01, 0.01, max_completion_tokens=64)], mint_url=mint.url,
                         reply=REPLY, chunk_delay=STREAM_CHUNK_DELAY).start()
        try:
            for mode in ("key", "wallet", "xcashu"):
                workdir = Path(tmp) / mode
                workdir.mkdir()
                db = str(workdir / "arbstr.db")
                funded_wallet(db, mint.url, 20_000)
                provider = f'[[providers]]\nname = "node"\nurl = "{node.url}"\nmodels = ["{MODEL}"]\n' \
                           f'input_rate = 10\noutput_rate = 10\npayment = "{mode}"\n'
                if mode == "key":
                    provider += f'api_key = "{key_from_wallet(db, mint.url, node, 10_000)}"\n'
                config = workdir / "config.toml"
                config.write_text(f'[database]\npath = "{db}"\n[routing]\nhealth_interval = 0\n'
                                  f'[wallet]\nmints = ["{mint.url}"]\nkey_funding_sats = 5000\n'
                                  f'xcashu_sats = 10\n' + provider)
                os.chmod(config, 0o600)
                process, port = start_serve(config, workdir)
                try:
                    rows[mode] = measure(port, args.requests, args.streams)
                finally:
                    process.terminate()
                    process.wait(30)
        finally:
            node.stop()
    key = rows["key"]
    print(f"\n{'payment':<8} {'req/s':>7} {'p50 ms':>8} {'TTFB ms':>8}   {'req/s vs key':>12} {'p50 vs key':>10} "
          f"{'TTFB vs key':>11}")
    for mode, (rate, p50, ttfb) in rows.items():
        print(f"{mode:<8} {rate:>7.1f} {p50:>8.1f} {ttfb:>8.1f}   {rate / key[0]:>12.2f} {p50 / key[1]:>10.2f} "
              f"{ttfb / key[2]:>11.2f}")
    print(f"\n{args.requests} sequential requests and {args.streams} streams per row; the node paces stream "
          f"chunks {STREAM_CHUNK_DELAY * 1000:g} ms apart ({len(REPLY.split())} chunks)")


if __name__ == "__main__":
    main()
