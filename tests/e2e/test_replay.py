"""Captured exchanges of a real Routstr node (tests/flows/*.mitm, read with mitmproxy's
FlowReader) replayed through the real proxy: the routing decision, the recorded usage and cost,
and the response the client gets."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import httpx
import pytest
from mitmproxy import http as mhttp
from mitmproxy import io

from arbstr.pricing import Rates, rates_from_sats_per_token

from conftest import provider_toml
from e2e.conftest import BIN, ROOT
from e2e.test_ledger import wait_for_rows

FLOWS = Path(__file__).resolve().parents[1] / "flows"


def recorded() -> dict[str, mhttp.HTTPFlow]:
    """The node's captured flows by what they show."""
    with open(FLOWS / "routstr-node.mitm", "rb") as f:
        flows = list(io.FlowReader(f).stream())
    chats = [f for f in flows if f.request.path == "/v1/chat/completions"]
    return {
        "models": next(f for f in flows if f.request.path == "/v1/models"),
        "chat": next(f for f in chats if f.response.status_code == 200 and not json.loads(f.request.content).get("stream")),
        "stream": next(f for f in chats if f.response.status_code == 200 and json.loads(f.request.content).get("stream")),
        "402": next(f for f in chats if f.response.status_code == 402),
        "400": next(f for f in chats if f.response.status_code == 400),
    }


class ReplayProvider:
    """Answers every chat completion with one recorded response, as the node sent it (a stream in
    event-sized chunks), and remembers what it was sent."""

    def __init__(self, flow: mhttp.HTTPFlow) -> None:
        response, received = flow.response, []
        self.received = received

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                received.append(({k.lower(): v for k, v in self.headers.items()},
                                 self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(response.status_code)
                for name, value in response.headers.items(multi=True):
                    if name.lower() not in ("content-length", "transfer-encoding", "date", "server"):
                        self.send_header(name, value)
                body = response.raw_content
                if "event-stream" in response.headers.get("content-type", ""):
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    for event in body.split(b"\n\n"):
                        if event:
                            piece = event + b"\n\n"
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                            self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def replay():
    started: list[ReplayProvider] = []

    def start(flow: mhttp.HTTPFlow) -> ReplayProvider:
        started.append(ReplayProvider(flow))
        return started[-1]

    yield start
    for provider in started:
        provider.stop()


def node_rates() -> Rates:
    """llama3:8b's prices from the node's own /v1/models."""
    model = next(m for m in json.loads(recorded()["models"].response.content)["data"] if m["id"] == "llama3:8b")
    prices = model["sats_pricing"]
    return rates_from_sats_per_token(prices["prompt"], prices["completion"], prices["request"])


def config_for(*providers: tuple[str, ReplayProvider]) -> str:
    rates = node_rates()
    return "".join(provider_toml(name, p.url, ["llama3:8b"], float(rates.input_per_1k), float(rates.output_per_1k),
                                 float(rates.per_request))
                   for name, p in providers) + '[routing]\nhealth_interval = 0\n[database]\npath = ":memory:"\n'


@pytest.mark.parametrize("case", ["chat", "stream"])
def test_a_recorded_answer_is_routed_recorded_and_passed_on(case, replay, start_proxy):
    flow = recorded()[case]
    node = replay(flow)
    proxy = start_proxy("serve", config_for(("node", node)))
    with httpx.Client(timeout=10) as http:
        answer = http.post(f"{proxy.url}/v1/chat/completions", content=flow.request.content,
                           headers={"content-type": "application/json", "authorization": "Bearer sk-client"})
    assert answer.headers["x-arbstr-provider"] == "node"
    if case == "chat":
        assert answer.content == b'{"arbstr_provider": "node", ' + flow.response.content[1:]
        assert answer.headers["x-routstr-cost-msats"] == "52"
    else:
        assert answer.content == flow.response.content  # every byte of the stream, unchanged
    [row] = wait_for_rows(proxy, 1)
    assert (row["input_tokens"], row["output_tokens"]) == (12, 5)
    assert row["cost_sats"] == "0.052" and row["cost_reported"] and not row["usage_estimated"]
    assert row["streaming"] is (case == "stream") and row["success"]
    headers, body = node.received[0]
    assert body == flow.request.content and headers["authorization"] == "Bearer sk-node-0123456789abcdef"


def test_a_recorded_402_sends_the_request_to_the_next_provider(replay, start_proxy):
    broke, fine = replay(recorded()["402"]), replay(recorded()["chat"])
    proxy = start_proxy("serve", config_for(("broke", broke), ("fine", fine)))
    with httpx.Client(timeout=10) as http:
        answer = http.post(f"{proxy.url}/v1/chat/completions", content=recorded()["chat"].request.content)
        health = {p["name"]: p for p in http.get(f"{proxy.url}/health").json()["providers"]}
    assert answer.status_code == 200 and answer.headers["x-arbstr-provider"] == "fine"
    assert answer.headers["x-arbstr-attempts"] == "broke=out_of_funds 402"
    assert health["broke"]["state"] == "out_of_funds"
    assert "6.143 sats (6143 msats) required" in health["broke"]["last_error"]


def test_a_recorded_invalid_model_400_fails_over(replay, start_proxy):
    # The real node's 400 invalid_model says its catalogue lacks the model, not that the request is
    # wrong: the next provider serves it.
    flow = recorded()["400"]
    node, spare = replay(flow), replay(recorded()["chat"])
    proxy = start_proxy("serve", config_for(("node", node), ("spare", spare)))
    with httpx.Client(timeout=10) as http:
        answer = http.post(f"{proxy.url}/v1/chat/completions",
                           json={"model": "llama3:8b", "messages": [{"role": "user", "content": "x"}]})
    assert answer.status_code == 200 and answer.headers["x-arbstr-provider"] == "spare"
    assert answer.headers["x-arbstr-attempts"] == "node=model_unknown 400"
    assert len(node.received) == 1 and len(spare.received) == 1
    [row] = wait_for_rows(proxy, 1)
    assert row["success"] and row["attempts"] == "node=model_unknown 400"


def test_make_capture_records_flows_without_secrets(start_provider, start_process, tmp_path):
    provider = start_provider("live", ["m"], 0.001, 0.001)
    out = tmp_path / "new.mitm"
    capture = start_process([str(BIN / "mitmdump"), "-s", str(ROOT / "tests" / "flows" / "capture.py"),
                             "--mode", f"reverse:{provider.url.removesuffix('/v1')}", "--listen-host", "127.0.0.1",
                             "-p", "0", "--set", f"capture_file={out}", "--set", f"confdir={tmp_path}"], name="capture")
    with httpx.Client(timeout=10) as http:
        answer = http.post(f"http://127.0.0.1:{capture.port}/v1/chat/completions",
                           headers={"authorization": "Bearer sk-live-secret-key-00000000", "x-cashu": "cashuBsecret"},
                           json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert answer.status_code == 200
    capture.stop()
    with open(out, "rb") as f:
        [flow] = list(io.FlowReader(f).stream())
    assert flow.request.headers["authorization"] == "REDACTED" and flow.request.headers["x-cashu"] == "REDACTED"
    assert json.loads(flow.response.content)["usage"]["prompt_tokens"] > 0
    assert b"sk-live-secret-key" not in out.read_bytes() and b"cashuBsecret" not in out.read_bytes()
