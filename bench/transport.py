"""What a TLS handshake costs a provider request, and what the connection pool saves: sequential
chat requests to an HTTPS mock node (its own CA) through arbstr's HTTP client, reusing one pooled
connection, and opening a fresh connection (a full handshake) for each; plain HTTP as baseline.

Prints requests/s and p50 latency for each (plain HTTP with a new connection each, for TCP's share). Loopback, ports the OS picks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from arbstr.connect import Connector, Route, ssl_context_for  # noqa: E402
from arbstr.httpclient import HttpClient  # noqa: E402
from arbstr.mock import MockModel, MockProvider, private_ca  # noqa: E402

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
HEADERS = [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-bench-0123456789")]


async def timed_requests(url: str, count: int, connector: Connector, *, pooled: bool) -> list[float]:
    client = HttpClient(10.0, connector=connector)
    latencies = []
    try:
        for _ in range(count):
            if not pooled:
                await client.aclose()
                client = HttpClient(10.0, connector=connector)
            started = time.perf_counter()
            response = await client.request("POST", url, HEADERS, BODY)
            await response.read()
            latencies.append(time.perf_counter() - started)
    finally:
        await client.aclose()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--requests", type=int, default=500, help="requests per row (default 500)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ca_file, server_context = private_ca(Path(tmp))
        models = [MockModel("m", 0.001, 0.001)]
        with MockProvider("plain", models) as plain, MockProvider("tls", models, tls=server_context) as secure:
            connector = Connector([(secure.url, Route(ssl_context_for(str(ca_file), True)))])
            rows = {}
            for name, url, pooled in (("http, pooled", plain.url, True), ("http, new connection each", plain.url, False),
                                      ("https, pooled", secure.url, True),
                                      ("https, new connection each", secure.url, False)):
                asyncio.run(timed_requests(url + "/chat/completions", 20, connector, pooled=pooled))  # warm up
                started = time.perf_counter()
                latencies = asyncio.run(timed_requests(url + "/chat/completions", args.requests, connector,
                                                       pooled=pooled))
                rows[name] = (args.requests / (time.perf_counter() - started), statistics.median(latencies))
            handshakes = secure.tls_handshakes
    for name, (rate, p50) in rows.items():
        print(f"{name:28} {rate:8.0f} req/s   p50 {p50 * 1000:6.2f} ms")
    pooled, fresh = rows["https, pooled"][1], rows["https, new connection each"][1]
    tcp = rows["http, new connection each"][1] - rows["http, pooled"][1]
    print(f"a new connection adds {(fresh - pooled) * 1000:.2f} ms to an https request ({fresh / pooled:.1f}x the "
          f"pooled p50), of which TCP alone {tcp * 1000:.2f} ms; TLS handshakes the node saw: {handshakes}")


if __name__ == "__main__":
    main()
