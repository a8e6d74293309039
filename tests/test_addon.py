"""The addon through mitmproxy's own test helpers: hooks called on flows, real mock providers behind."""

from __future__ import annotations

import asyncio
import json
import re
from types import SimpleNamespace

import pytest
from mitmproxy import http, options, tls
from mitmproxy.exceptions import OptionsError
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow

from arbstr.addon import ArbstrAddon, _add_provider_field, config_path, header_lookup
from arbstr.config import parse_config
from arbstr.httpclient import HttpClient
from arbstr.relay import StreamRelay

from conftest import chat_requests, provider_toml

CLIENT_KEY = "sk-client-key-0000000000000000"


def chat_flow(body: dict | bytes, method: str = "POST", path: str = "/v1/chat/completions",
              headers: dict | None = None) -> http.HTTPFlow:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = http.Request.make(method, f"http://127.0.0.1:1{path}", content,
                                {"content-type": "application/json", "authorization": f"Bearer {CLIENT_KEY}",
                                 **(headers or {})})
    flow = tflow.tflow(req=request)
    flow.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:1")
    return flow


@pytest.fixture
def harness(start_provider):
    """An addon configured with one mock provider, and a way to run hooks on its event loop."""
    provider = start_provider("solo", ["gpt-4o"], 0.001, 0.002)
    config = parse_config(provider_toml("solo", provider.url, ["gpt-4o"], 1, 2, api_key="sk-solo-provider-0000000")
                          + '[database]\npath = ":memory:"\n', environ={})
    addon = ArbstrAddon(config)
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        run = tctx.master.event_loop.run_until_complete

        def hooks(flow: http.HTTPFlow) -> http.HTTPFlow:
            addon.requestheaders(flow)
            run(addon.request(flow))
            if flow.response is not None:
                addon.responseheaders(flow)
            return flow

        yield provider, addon, hooks, run
        run(addon.done())


class TestLocal:
    def test_models(self, harness):
        _, _, hooks, _ = harness
        flow = hooks(chat_flow(b"", method="GET", path="/v1/models"))
        assert flow.response.status_code == 200
        assert [m["id"] for m in json.loads(flow.response.content)["data"]] == ["gpt-4o"]
        assert flow.comment == "arbstr: local /v1/models"

    @pytest.mark.parametrize("method,path,status,code", [
        ("POST", "/v1/models", 405, "method_not_allowed"),
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
        ("GET", "/v1/embeddings", 404, "not_found"),
    ])
    def test_wrong_method_or_path(self, harness, method, path, status, code):
        provider, _, hooks, _ = harness
        flow = hooks(chat_flow(b"", method=method, path=path))
        assert flow.response.status_code == status
        assert json.loads(flow.response.content)["error"]["code"] == code
        assert not chat_requests(provider)


class TestErrors:
    def test_bad_body_is_a_json_400_and_marked(self, harness):
        provider, _, hooks, _ = harness
        flow = hooks(chat_flow(b"{oops"))
        assert flow.response.status_code == 400
        assert flow.response.headers["content-type"] == "application/json"
        assert json.loads(flow.response.content)["error"]["code"] == "invalid_json"
        assert flow.marked and "invalid_json" in flow.comment
        assert len(flow.response.headers["x-arbstr-request-id"]) == 32
        assert not chat_requests(provider)

    def test_provider_down_is_502(self, harness):
        provider, _, hooks, _ = harness
        provider.stop()
        flow = hooks(chat_flow({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}))
        assert flow.response.status_code == 502
        assert "solo" in json.loads(flow.response.content)["error"]["message"]


class TestRouted:
    def test_whole_answer_becomes_the_response(self, harness):
        provider, _, hooks, _ = harness
        flow = hooks(chat_flow({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                               headers={"x-arbstr-policy": "default", "cookie": "a=b"}))
        assert flow.response.status_code == 200
        body = json.loads(flow.response.content)
        assert body["arbstr_provider"] == "solo" and body["choices"][0]["message"]["content"] == "Hello from solo"
        assert flow.response.headers["x-arbstr-provider"] == "solo"
        assert flow.response.headers["x-arbstr-attempts"] == "none"
        assert int(flow.response.headers["content-length"]) == len(flow.response.raw_content)
        assert flow.request.url == provider.url + "/chat/completions"
        # what mitmweb shows is the request the provider received, with no client secret and no provider key
        assert list(flow.request.headers.items()) == [
            ("host", provider.url.removeprefix("http://").removesuffix("/v1")), ("content-type", "application/json"),
            ("authorization", "[provider credential]"), ("accept-encoding", "identity"),
            ("content-length", str(len(flow.request.content)))]
        assert flow.server_conn.address == (flow.request.host, flow.request.port)
        assert re.fullmatch(r"gpt-4o → solo [0-9.]+ sats", flow.comment)
        meta = flow.metadata["arbstr"]
        assert meta["cost_sats"] == flow.comment.split()[3] and meta["policy"] == "default"
        assert meta["tries"] == [{"provider": "solo", "url": provider.url + "/chat/completions", "state": "ok",
                                  "status": 200, "detail": ""}]
        assert chat_requests(provider)[0].header("authorization") == "Bearer sk-solo-provider-0000000"

    def test_nothing_is_dressed_for_views_where_none_exists(self, harness):
        """`arbstr serve` (shows_flows=False) answers the same without the comment, the tries and the costs."""
        _, addon, hooks, _ = harness
        addon.shows_flows = False
        flow = hooks(chat_flow({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        assert flow.response.status_code == 200 and flow.response.headers["x-arbstr-provider"] == "solo"
        assert json.loads(flow.response.content)["arbstr_provider"] == "solo"
        assert flow.comment == "" and not flow.marked
        assert not {"tries", "estimated_sats", "cost_sats"} & set(flow.metadata["arbstr"])
        assert flow.metadata["arbstr"]["provider"] == "solo"

    def test_stream_is_handed_to_the_relay(self, harness):
        provider, addon, hooks, run = harness
        flow = chat_flow({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True})
        addon.requestheaders(flow)
        run(addon.request(flow))
        assert flow.response is None  # mitmproxy will fetch it from the relay
        assert (flow.request.host, flow.request.port, flow.request.scheme) == ("127.0.0.1", addon._relay.port, "http")
        assert StreamRelay.TICKET_HEADER in flow.request.headers
        # fetch it from the relay as mitmproxy would
        client = HttpClient(connect_timeout=2)
        relayed = run(client.request("POST", f"http://127.0.0.1:{flow.request.port}{flow.request.path}",
                                     [(k, v) for k, v in flow.request.headers.fields
                                      if k.lower() not in (b"host", b"content-length")], flow.request.raw_content))
        body = run(relayed.read())
        run(client.aclose())
        assert relayed.status == 200 and relayed.header("x-arbstr-provider") == "solo"
        assert relayed.header("x-arbstr-policy") == "default" and relayed.header("x-arbstr-attempts") == "none"
        assert body.rstrip().endswith(b"data: [DONE]")
        flow.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
        addon.responseheaders(flow)
        assert flow.response.stream is True and StreamRelay.TICKET_HEADER not in flow.request.headers
        # once mitmproxy has reached the relay, the flow shows the request the provider received, and
        # the provider as its server, while the stream still flows
        assert flow.request.url == provider.url + "/chat/completions"
        assert flow.request.headers["authorization"] == "[provider credential]"
        assert flow.server_conn.address == ("127.0.0.1", provider.port)
        run(addon.response(flow))
        assert flow.server_conn.address == ("127.0.0.1", provider.port)
        assert flow.response.raw_content == b""  # no view of the flows here: no copy kept


class TestProviderField:
    @pytest.mark.parametrize("raw,expected", [
        (b'{"id": 1}', {"arbstr_provider": "p", "id": 1}),
        (b'{}', {"arbstr_provider": "p"}),
        (b'{ \n }', {"arbstr_provider": "p"}),
    ])
    def test_inserted_without_reencoding(self, raw, expected):
        out = _add_provider_field(raw, "p")
        assert json.loads(out) == expected
        assert out.endswith(raw[1:].lstrip())


def regular_flow(url: str, body: bytes = b"", method: str = "POST") -> http.HTTPFlow:
    request = http.Request.make(method, url, body, {"content-type": "application/json",
                                                    "authorization": f"Bearer {CLIENT_KEY}"})
    flow = tflow.tflow(req=request)
    flow.client_conn.proxy_mode = ProxyMode.parse("regular")
    return flow


class TestIntercept:
    CHAT = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()

    def test_chat_to_an_intercepted_host_is_routed(self, harness):
        provider, _, hooks, _ = harness
        flow = hooks(regular_flow("https://api.openai.com/v1/chat/completions", self.CHAT))
        assert flow.response.status_code == 200
        assert flow.response.headers["x-arbstr-provider"] == "solo"
        # the tool's own key is gone; the flow shows the provider's credential, masked
        assert flow.request.headers["authorization"] == "[provider credential]"
        assert CLIENT_KEY not in str(flow.get_state())
        assert chat_requests(provider)[0].header("authorization") == "Bearer sk-solo-provider-0000000"

    def test_models_on_an_intercepted_host_are_arbstrs(self, harness):
        _, _, hooks, _ = harness
        flow = hooks(regular_flow("https://api.openai.com/v1/models", method="GET"))
        assert [m["id"] for m in json.loads(flow.response.content)["data"]] == ["gpt-4o"]

    @pytest.mark.parametrize("url", ["https://api.openai.com/v1/embeddings", "https://example.org/v1/chat/completions",
                                     "http://127.0.0.1:9/anything"])
    def test_everything_else_passes_untouched(self, harness, url):
        provider, _, hooks, _ = harness
        flow = hooks(regular_flow(url, self.CHAT))
        assert flow.response is None and flow.comment == ""
        assert flow.request.url == url and flow.request.headers["authorization"] == f"Bearer {CLIENT_KEY}"
        assert not chat_requests(provider)

    @pytest.mark.parametrize("sni,mode,ignored", [
        ("api.openai.com", "regular", False), ("API.OPENAI.COM", "regular", False),
        ("github.com", "regular", True), ("github.com", "reverse:http://127.0.0.1:1", False),
    ])
    def test_tls_to_other_hosts_is_not_decrypted(self, harness, sni, mode, ignored):
        _, addon, _, _ = harness
        data = tls.ClientHelloData(context=_context(mode), client_hello=SimpleNamespace(sni=sni))
        addon.tls_clienthello(data)
        assert data.ignore_connection is ignored


def _context(mode: str) -> Context:
    client = tflow.tclient_conn()
    client.proxy_mode = ProxyMode.parse(mode)
    context = Context(client, options.Options())
    context.server = tflow.tserver_conn()
    return context


def test_config_path_precedence(monkeypatch):
    monkeypatch.delenv("ARBSTR_CONFIG", raising=False)
    assert config_path("") == "config.toml"
    monkeypatch.setenv("ARBSTR_CONFIG", "/etc/arbstr.toml")
    assert config_path("") == "/etc/arbstr.toml"
    assert config_path("/opt/given.toml") == "/opt/given.toml"


def test_an_unknown_relay_ticket_gets_a_json_error():
    async def go():
        relay = StreamRelay()
        await relay.start()
        client = HttpClient(connect_timeout=2)
        answer = await client.request("POST", f"http://127.0.0.1:{relay.port}/v1/chat/completions",
                                      [(StreamRelay.TICKET_HEADER.encode(), b"made-up")], b"{}")
        body = json.loads(await answer.read())
        await client.aclose()
        await relay.stop()
        return answer.status, body["error"]["code"]

    assert asyncio.run(go()) == (502, "stream_expired")


@pytest.mark.parametrize("coding,compress", [
    ("gzip", lambda b: __import__("gzip").compress(b)), ("deflate", lambda b: __import__("zlib").compress(b)),
    ("br", lambda b: __import__("brotli").compress(b)),
])
def test_an_encoded_stream_is_decoded_piece_by_piece_for_its_usage(coding, compress):
    from arbstr.addon import stream_decoder
    from arbstr.usage import StreamUsageObserver
    sse = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}\n\ndata: [DONE]\n\n'
    encoded, decode, observer = compress(sse), stream_decoder(coding), StreamUsageObserver()
    for i in range(0, len(encoded), 5):
        observer.feed(decode(encoded[i:i + 5]))
    report = observer.finish()
    assert (report.input_tokens, report.output_tokens, report.complete) == (3, 4, True)
    assert stream_decoder("identity") is None and stream_decoder("zstd-unknown")(b"x") == b""


class TestListening:
    def test_a_request_that_arrived_from_the_network_needs_the_token(self, harness):
        _, _, hooks, _ = harness
        flow = chat_flow(b"", method="GET", path="/v1/models")
        flow.client_conn.sockname = ("192.0.2.7", 8080)
        assert hooks(flow).response.status_code == 401
        assert "only its own machine" in flow.response.json()["error"]["message"]

    @pytest.mark.parametrize("sockname", [("127.0.0.1", 8080), ("::1", 8080), ("::ffff:127.0.0.1", 8080)])
    def test_loopback_clients_are_served(self, harness, sockname):
        _, _, hooks, _ = harness
        flow = chat_flow(b"", method="GET", path="/v1/models")
        flow.client_conn.sockname = sockname
        assert hooks(flow).response.status_code == 200

    @pytest.mark.parametrize("listen_host", ["", "0.0.0.0", "192.0.2.7", "::"])
    def test_a_listener_others_can_reach_is_refused_without_a_token(self, listen_host):
        addon = ArbstrAddon(parse_config(provider_toml("a", "http://127.0.0.1:9", ["gpt-4o"], 1, 1)
                                         + '[database]\npath = ":memory:"\n', environ={}))
        with taddons.context(addon) as tctx:
            with pytest.raises(OptionsError, match="will not listen on .* without \\[server\\] auth_token"):
                tctx.configure(addon, listen_host=listen_host, mode=["reverse:http://127.0.0.1:1"])
            tctx.configure(addon, listen_host="127.0.0.1", mode=["reverse:http://127.0.0.1:1"])
            with pytest.raises(OptionsError, match="will not listen on 192.0.2.7"):
                tctx.configure(addon, mode=["reverse:http://127.0.0.1:1@192.0.2.7:8080"])

    def test_a_token_allows_any_listener(self):
        addon = ArbstrAddon(parse_config(provider_toml("a", "http://127.0.0.1:9", ["gpt-4o"], 1, 1)
                                         + '[server]\nauth_token = "t0ken"\n[database]\npath = ":memory:"\n',
                                         environ={}))
        with taddons.context(addon) as tctx:
            tctx.configure(addon, listen_host="0.0.0.0")
            assert tctx.options.listen_host == "0.0.0.0"

    def test_server_listen_is_used_unless_the_command_line_said(self):
        addon = ArbstrAddon(parse_config(provider_toml("a", "http://127.0.0.1:9", ["gpt-4o"], 1, 1)
                                         + '[server]\nlisten = "127.0.0.2:9123"\n[database]\npath = ":memory:"\n',
                                         environ={}))
        with taddons.context(addon) as tctx:
            tctx.configure(addon)
            assert (tctx.options.listen_host, tctx.options.listen_port) == ("127.0.0.2", 9123)
        addon = ArbstrAddon(parse_config(provider_toml("a", "http://127.0.0.1:9", ["gpt-4o"], 1, 1)
                                         + '[server]\nlisten = "127.0.0.2:9123"\n[database]\npath = ":memory:"\n',
                                         environ={}))
        with taddons.context(addon) as tctx:
            tctx.options.update(listen_port=0)
            tctx.configure(addon)
            assert (tctx.options.listen_host, tctx.options.listen_port) == ("127.0.0.2", 0)


@pytest.mark.parametrize("fields", [
    [(b"User-Agent", b"OpenAI/Python 1.55.0"), (b"X-Title", b"notes")],
    [(b"x-title", b"a"), (b"X-TITLE", b"b"), (b"content-length", b"12")],
    [(b"HTTP-Referer", b"https://app.example/x"), (b"x-arbstr-app", b"\xe9t\xe9")],
    [],
])
def test_header_lookup_reads_as_mitmproxy_headers_do(fields):
    names = frozenset({b"x-title", b"user-agent", b"content-length", b"x-arbstr-app", b"http-referer"})
    lookup, headers = header_lookup(tuple(fields), names), http.Headers(fields)
    for name in ("x-title", "User-Agent", "content-length", "x-arbstr-app", "HTTP-REFERER"):
        assert lookup(name) == headers.get(name)
