"""Does a hostile client slow everyone else down? `/health` latency through `arbstr serve`, alone
and while clients send 10,000-header requests back to back (each gets a 431).

Prints p50 and max `/health` latency for both phases, their ratio, and how long each flood
request took to be refused. Everything runs on 127.0.0.1 with ports the OS picks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy import print_machine, running_proxy, upstream  # noqa: E402


def flood_request(count: int) -> bytes:
    head = [b"POST /v1/chat/completions HTTP/1.1", b"host: arbstr", b"content-length: 2"]
    head += [b"x-filler-%d: %d" % (i, i) for i in range(count)]
    return b"\r\n".join(head) + b"\r\n\r\n{}"


def flood(port: int, count: int, stop: threading.Event, took: list[float]) -> None:
    import socket
    data = flood_request(count)
    while not stop.is_set():
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(data)
            answer = sock.recv(65536)
        took.append(time.perf_counter() - started)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:80]


def health_latencies(port: int, count: int) -> list[float]:
    latencies = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        for _ in range(count):
            started = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - started)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--headers", type=int, default=10_000, help="headers per flood request (default 10000)")
    parser.add_argument("--flooders", type=int, default=2, help="concurrent flooding clients (default 2)")
    parser.add_argument("--requests", type=int, default=200, help="/health requests per phase (default 200)")
    args = parser.parse_args()
    print_machine(["arbstr"])
    with tempfile.TemporaryDirectory() as tmp, upstream(0.0, "hi") as (upstream_port, _), \
            running_proxy("arbstr", upstream_port, Path(tmp) / "arbstr", None) as proxy:
        health_latencies(proxy.port, 20)  # warm up
        alone = health_latencies(proxy.port, args.requests)
        stop, took = threading.Event(), []
        threads = [threading.Thread(target=flood, args=(proxy.port, args.headers, stop, took))
                   for _ in range(args.flooders)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        flooded = health_latencies(proxy.port, args.requests)
        stop.set()
        for thread in threads:
            thread.join()
    ms = lambda seconds: f"{seconds * 1000:.1f} ms"  # noqa: E731
    print(f"/health alone:          p50 {ms(statistics.median(alone))}, max {ms(max(alone))}")
    print(f"/health during floods:  p50 {ms(statistics.median(flooded))}, max {ms(max(flooded))} "
          f"({args.flooders} clients sending {args.headers:,}-header requests)")
    print(f"ratio (p50 flooded / alone): {statistics.median(flooded) / statistics.median(alone):.1f}x")
    print(f"flood requests refused (431): {len(took)}, p50 {ms(statistics.median(took))}, max {ms(max(took))}")


if __name__ == "__main__":
    main()
