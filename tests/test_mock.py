"""The mock Routstr provider, over real HTTP on loopback: wire shapes as in the captures, costs, faults."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from arbstr.mock import INITIAL_BALANCE_MSATS, MockModel, MockProvider

KEY = "sk-test"
AUTH = {"authorization": f"Bearer {KEY}"}
# Priced like the captured node's llama3:8b, plus a flat fee: 0.00303 sats/token each way, 0.001 sats/request.
LLAMA = MockModel("llama3:8b", 0.00303, 0.00303, 0.001, context_length=4096, max_completion_tokens=2048)
# Prices whose float products are inexact: only decimal arithmetic gives the expected msats.
PRICEY = MockModel("pricey", 0.1234, 0.5, 0.0025, bills_request_fee=True)
DISABLED = MockModel("retired", 0.001, 0.001, enabled=False)
# 2 + 3 words and 4 tokens per message: 13 prompt tokens.
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there you"}]

# From routstr-samples/: one models.json entry, chat.json, and the last chunk of stream.sse.
SAMPLE_MODEL = json.loads(
    '{"id":"llama3:8b","name":"llama3 8b","created":0,"description":"Ollama llama model (8B)","context_length":4096,'
    '"architecture":{"modality":"text","input_modalities":["text"],"output_modalities":["text"],"tokenizer":"gguf",'
    '"instruct_type":null},"pricing":{"prompt":3.0300000000000002e-06,"completion":3.0300000000000002e-06,'
    '"request":0.0,"image":0.0,"web_search":0.0,"internal_reasoning":0.0,"input_cache_read":0.0,'
    '"input_cache_write":0.0,"max_prompt_cost":0.012410880000000001,"max_completion_cost":0.0062054400000000004,'
    '"max_cost":0.012410880000000001},"sats_pricing":{"prompt":0.00303,"completion":0.00303,"request":0.001,'
    '"image":0.0,"web_search":0.0,"internal_reasoning":0.0,"input_cache_read":0.0,"input_cache_write":0.0,'
    '"max_prompt_cost":12.41088,"max_completion_cost":6.20544,"max_cost":12.41088},"per_request_limits":null,'
    '"top_provider":{"context_length":4096,"max_completion_tokens":2048,"is_moderated":false},"enabled":true,'
    '"upstream_provider_id":"ollama","canonical_slug":null,"alias_ids":null,"forwarded_model_id":null}')
SAMPLE_CHAT = json.loads(
    '{"id": "chatcmpl-048fca87", "object": "chat.completion", "created": 1795426002, "model": "llama3:8b", "choices":'
    ' [{"index": 0, "message": {"role": "assistant", "content": "Hello from fake upstream"}, "finish_reason": "stop"}],'
    ' "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17, "cost": {"base_msats": 0,'
    ' "input_msats": 37, "output_msats": 15, "total_msats": 52, "cache_read_input_tokens": 0,'
    ' "cache_creation_input_tokens": 0, "cache_read_msats": 0, "cache_creation_msats": 0, "total_usd": 5.2e-05},'
    ' "cost_sats": 0, "remaining_balance_msats": 99999770}, "provider": "ollama", "metadata": {"routstr": {"cost":'
    ' {"base_msats": 0, "input_msats": 37, "output_msats": 15, "total_msats": 52, "total_usd": 5.2e-05,'
    ' "input_tokens": 12, "output_tokens": 5, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0,'
    ' "cache_read_msats": 0, "cache_creation_msats": 0, "sats_cost": 0, "remaining_balance_msats": 99999770}}},'
    ' "cost": {"base_msats": 0, "input_msats": 37, "output_msats": 15, "total_msats": 52, "total_usd": 5.2e-05,'
    ' "input_tokens": 12, "output_tokens": 5, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0,'
    ' "cache_read_msats": 0, "cache_creation_msats": 0, "sats_cost": 0, "remaining_balance_msats": 99999770}}')
SAMPLE_USAGE_CHUNK = json.loads(
    '{"id": "chatcmpl-6ebfa563", "object": "chat.completion.chunk", "model": "llama3:8b", "choices": [], "usage":'
    ' {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17, "cost": {"base_msats": 0, "input_msats": 37,'
    ' "output_msats": 15, "total_msats": 52, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0,'
    ' "cache_read_msats": 0, "cache_creation_msats": 0, "total_usd": 5.2e-05}, "cost_sats": 0,'
    ' "remaining_balance_msats": 99999718}, "provider": "ollama", "metadata": {"routstr": {"cost": {"base_msats": 0,'
    ' "input_msats": 37, "output_msats": 15, "total_msats": 52, "total_usd": 5.2e-05, "input_tokens": 12,'
    ' "output_tokens": 5, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_msats": 0,'
    ' "cache_creation_msats": 0}, "sats_cost": 0, "remaining_balance_msats": 99999718}}, "cost": {"base_msats": 0,'
    ' "input_msats": 37, "output_msats": 15, "total_msats": 52, "total_usd": 5.2e-05, "input_tokens": 12,'
    ' "output_tokens": 5, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_msats": 0,'
    ' "cache_creation_msats": 0, "sats_cost": 0, "remaining_balance_msats": 99999718}}')
CHAT_HEADER_NAMES = ["date", "server", "date", "content-type", "x-routstr-cost-msats", "x-routstr-input-cost-msats",
                     "x-routstr-output-cost-msats", "x-routstr-cost-usd", "content-length", "x-routstr-request-id"]
STREAM_HEADER_NAMES = ["date", "server", "date", "server", "content-type", "x-routstr-request-id",
                       "transfer-encoding"]
ERROR_HEADER_NAMES = ["date", "server", "content-length", "content-type", "x-routstr-request-id"]


def shape(value: object) -> object:
    """The keys of a JSON value, recursively: what must match the captures."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return None


def header_names(response: httpx.Response) -> list[str]:
    return [name.decode().lower() for name, _ in response.headers.raw]


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    events = text.removesuffix("\n\n").split("\n\n")
    assert all(event.startswith("data: ") for event in events)
    return [event.removeprefix("data: ") for event in events]


@pytest.fixture
def start() -> Iterator:
    """Start mock providers (LLAMA, PRICEY, DISABLED by default); all are stopped after the test."""
    started: list[MockProvider] = []

    def start_provider(name: str = "alpha", models: list[MockModel] | None = None, **kwargs) -> MockProvider:
        provider = MockProvider(name, models or [LLAMA, PRICEY, DISABLED], **kwargs)
        started.append(provider.start())
        return provider

    yield start_provider
    for provider in started:
        provider.stop()


@pytest.fixture
def provider(start) -> MockProvider:
    return start()


@pytest.fixture
def http(provider: MockProvider) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=provider.url, timeout=5) as client:
        yield client


def chat(http: httpx.Client, model: str = "llama3:8b", headers: dict | None = None, **fields) -> httpx.Response:
    return http.post("/chat/completions", headers=AUTH if headers is None else headers,
                     json={"model": model, "messages": MESSAGES, **fields})


def balance(http: httpx.Client, key: str = KEY) -> dict:
    return http.get("/balance/info", headers={"authorization": f"Bearer {key}"}).json()


def ledger(http: httpx.Client, key: str = KEY) -> tuple[int, int, int, int]:
    """(balance, reserved, total_spent, total_requests) of a key, in msats."""
    info = balance(http, key)
    return info["balance"], info["reserved"], info["total_spent"], info["total_requests"]


def test_models_are_shaped_and_priced_like_the_capture(start):
    as_captured = MockModel("llama3:8b", 0.00303, 0.00303, context_length=4096, max_completion_tokens=2048)
    provider = start(models=[as_captured, DISABLED])
    with httpx.Client(base_url=provider.url) as http:
        answer = http.get("/models")
    assert header_names(answer) == ERROR_HEADER_NAMES
    listed = answer.json()
    assert list(listed) == ["data"]
    llama, retired = listed["data"]
    assert shape(llama) == shape(SAMPLE_MODEL)
    for prices in ("sats_pricing", "pricing"):
        for field in ("prompt", "completion", "max_prompt_cost", "max_completion_cost", "max_cost"):
            assert llama[prices][field] == pytest.approx(SAMPLE_MODEL[prices][field], rel=1e-12), (prices, field)
    assert llama["top_provider"] == SAMPLE_MODEL["top_provider"]
    assert (llama["enabled"], retired["enabled"]) == (True, False)
    # Without an explicit limit the model may generate a quarter of its context.
    assert retired["top_provider"]["max_completion_tokens"] == 8192 // 4


def test_max_cost_includes_the_request_fee(http):
    pricey = next(m for m in http.get("/models").json()["data"] if m["id"] == "pricey")
    sats = pricey["sats_pricing"]
    assert sats["request"] == 0.0025
    assert sats["max_cost"] == pytest.approx((8192 - 2048) * 0.1234 + 2048 * 0.5 + 0.0025)


def test_chat_matches_the_capture_with_exact_costs(provider, http):
    answer = chat(http)
    assert answer.status_code == 200
    assert header_names(answer) == CHAT_HEADER_NAMES
    body = answer.json()
    assert shape(body) == shape(SAMPLE_CHAT)
    assert body["id"].startswith("chatcmpl-") and body["model"] == "llama3:8b" and body["provider"] == "mock"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello from alpha"}
    # 13 prompt tokens × 3.03 msats = 39.39 -> 40; 3 completion tokens -> 9.09 -> 10; the advertised
    # 0.001 sats fee is not billed (base_msats 0), as on routstr-core v0.4.5 and in the capture.
    remaining = INITIAL_BALANCE_MSATS - 50
    assert body["usage"] == {
        "prompt_tokens": 13, "completion_tokens": 3, "total_tokens": 16,
        "cost": {"base_msats": 0, "input_msats": 40, "output_msats": 10, "total_msats": 50,
                 "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_msats": 0,
                 "cache_creation_msats": 0, "total_usd": 5e-05},
        "cost_sats": 0, "remaining_balance_msats": remaining}
    assert body["cost"] == body["metadata"]["routstr"]["cost"]
    assert (body["cost"]["sats_cost"], body["cost"]["remaining_balance_msats"]) == (0, remaining)
    assert (answer.headers["x-routstr-cost-msats"], answer.headers["x-routstr-input-cost-msats"],
            answer.headers["x-routstr-output-cost-msats"], answer.headers["x-routstr-cost-usd"]) == (
        "50", "40", "10", "5e-05")
    assert re.fullmatch(r"[0-9a-f-]{36}", answer.headers["x-routstr-request-id"])
    assert balance(http) | {"api_key": None} == {
        "api_key": None, "balance": remaining, "reserved": 0, "is_child": False, "total_requests": 1,
        "total_spent": 50, "balance_limit": None, "balance_limit_reset": None, "validity_date": None}


def test_costs_use_exact_decimals_and_whole_sats_round_down(http):
    cost = chat(http, "pricey").json()["usage"]["cost"]
    # 13 × 123.4 = 1604.2 -> 1605; 3 × 500 = 1500; 2.5 msat fee rounds half up to 3.
    assert (cost["input_msats"], cost["output_msats"], cost["base_msats"], cost["total_msats"]) == (1605, 1500, 3, 3108)
    assert chat(http, "pricey").json()["usage"]["cost_sats"] == 3


def test_openai_client_reads_completions_and_counts_list_contents(provider):
    client = openai.OpenAI(base_url=provider.url, api_key=KEY, max_retries=0, timeout=5)
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is"},
                                             {"type": "image_url", "image_url": {"url": "data:,"}},
                                             {"type": "text", "text": "this"}]}]
    assert [model.id for model in client.models.list()] == ["llama3:8b", "pricey", "retired"]
    raw = client.chat.completions.with_raw_response.create(model="llama3:8b", messages=messages)
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from alpha"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3 + 4, 3)
    assert raw.headers["x-routstr-cost-msats"] == str(completion.usage.model_extra["cost"]["total_msats"])


@pytest.mark.parametrize("limit_field", ["max_tokens", "max_completion_tokens"])
def test_token_limit_truncates_the_reply(http, limit_field):
    body = chat(http, **{limit_field: 2}).json()
    assert body["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "Hello from"},
                                  "finish_reason": "length"}
    assert body["usage"]["completion_tokens"] == 2


def test_stream_ends_with_a_usage_chunk_then_done(provider, http):
    with http.stream("POST", "/chat/completions", headers=AUTH,
                     json={"model": "llama3:8b", "messages": MESSAGES, "stream": True}) as answer:
        text = answer.read().decode()
    assert answer.status_code == 200
    assert header_names(answer) == STREAM_HEADER_NAMES
    assert answer.headers["content-type"] == "text/event-stream; charset=utf-8"
    *chunks, done = sse_events(text)
    assert done == "[DONE]"
    *content, finish, usage = [json.loads(chunk) for chunk in chunks]
    assert [c["choices"][0]["delta"]["content"] for c in content] == ["Hello ", "from ", "alpha "]
    assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert shape(usage) == shape(SAMPLE_USAGE_CHUNK)
    assert usage["usage"]["cost"]["total_msats"] == 50
    assert usage["usage"]["remaining_balance_msats"] == INITIAL_BALANCE_MSATS - 50
    assert balance(http)["total_spent"] == 50


def test_each_stream_event_is_its_own_http_chunk(provider):
    body = json.dumps({"model": "llama3:8b", "messages": MESSAGES, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", provider.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-a\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while not received.endswith(b"\r\n0\r\n\r\n"):
            received += sock.recv(65536)
    payload = received.split(b"\r\n\r\n", 1)[1]
    chunks = []
    while True:
        size_line, payload = payload.split(b"\r\n", 1)
        size = int(size_line, 16)
        if not size:
            break
        chunks.append(payload[:size])
        payload = payload[size + 2:]
    assert len(chunks) == 3 + 1 + 1 + 1
    assert all(chunk.startswith(b"data: ") and chunk.count(b"data: ") == 1 and chunk.endswith(b"\n\n")
               for chunk in chunks)


def test_openai_client_streams_and_gets_usage_without_asking(provider):
    provider.reply = "one two three four"
    provider.chunk_delay = 0.01
    client = openai.OpenAI(base_url=provider.url, api_key=KEY, max_retries=0, timeout=5)
    text, usage = "", None
    for chunk in client.chat.completions.create(model="llama3:8b", messages=MESSAGES, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == "one two three four "
    assert (usage.prompt_tokens, usage.completion_tokens) == (13, 4)


def test_missing_or_bad_key_is_401(http):
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic sk-test"}):
        answer = chat(http, headers=headers)
        assert answer.status_code == 401, headers
        body = answer.json()
        assert list(body) == ["detail", "error", "request_id"]
        assert body["detail"]["error"] == body["error"]
        assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "invalid_request_error"
        assert body["request_id"] == answer.headers["x-routstr-request-id"]
    assert http.get("/balance/info").status_code == 401


def test_api_keys_restrict_which_keys_work(start):
    provider = start(api_keys={"sk-allowed", "plain-secret"})
    client = openai.OpenAI(base_url=provider.url, api_key="sk-other", max_retries=0, timeout=5)
    with pytest.raises(openai.AuthenticationError) as error:
        client.chat.completions.create(model="llama3:8b", messages=MESSAGES)
    assert error.value.code == "invalid_api_key"
    for key in ("sk-allowed", "plain-secret"):
        client = openai.OpenAI(base_url=provider.url, api_key=key, max_retries=0, timeout=5)
        assert client.chat.completions.create(model="llama3:8b", messages=MESSAGES).choices


def test_cashu_bearer_tokens_are_keys_with_their_own_balance(http):
    token = "cashuAfake.bearer.token.for.tests"  # not ecash: the mock only checks the prefix
    assert chat(http, headers={"authorization": f"Bearer {token}"}).status_code == 200
    info = balance(http, token)
    assert info["api_key"].startswith("sk-") and token not in info["api_key"]
    assert info["total_spent"] == 50 and balance(http)["total_spent"] == 0


@pytest.mark.parametrize("model", ["no-such-model", "retired"])
def test_unknown_or_disabled_model_is_400(http, model):
    answer = chat(http, model)
    assert answer.status_code == 400
    assert answer.json() == {"error": {"message": f"Model '{model}' not found", "type": "invalid_model",
                                       "code": 400},
                             "request_id": answer.headers["x-routstr-request-id"]}


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"model": "llama3:8b"}', b'{"messages": []}',
                                  b'{"model": "llama3:8b", "messages": [{"content": "x"}], "max_tokens": 0}'])
def test_malformed_chat_bodies_are_400(http, body):
    answer = http.post("/chat/completions", headers=AUTH, content=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_poor_key_gets_402_and_keeps_its_balance(provider, http):
    provider.set_balance("sk-poor", 1000)
    answer = chat(http, headers={"authorization": "Bearer sk-poor"})
    assert answer.status_code == 402
    assert header_names(answer) == ERROR_HEADER_NAMES
    body = answer.json()
    # Reserved: 40 msats of prompt, a full 2048-token completion (6205.44 -> 6206) and the 1 msat fee.
    message = ("Insufficient balance: 6.247 sats (6247 msats) required for this model; "
               "1 sats (1000 msats) available.")
    assert body == {"detail": {"error": {"message": message, "type": "insufficient_quota",
                                         "code": "insufficient_balance"}},
                    "error": {"message": message, "type": "insufficient_quota", "code": "insufficient_balance"},
                    "request_id": answer.headers["x-routstr-request-id"]}
    assert ledger(http, "sk-poor") == (1000, 0, 0, 0)
    # A smaller max_tokens reserves less, and then fits.
    assert chat(http, headers={"authorization": "Bearer sk-poor"}, max_tokens=100).status_code == 200
    assert ledger(http, "sk-poor") == (1000 - 50, 0, 50, 1)


@pytest.mark.parametrize("status,code", [
    (400, 400), (401, "invalid_api_key"), (402, "insufficient_balance"), (429, "rate_limit_exceeded"),
    (500, "upstream_error"), (502, "upstream_error"), (503, "cashu_mint_unreachable"), (418, "mock_failure"),
])
def test_fail_status_answers_routstr_errors(provider, http, status, code):
    provider.fail_status = status
    answer = chat(http)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["error"]["code"] == code and body["error"]["message"]
    assert body["request_id"] == answer.headers["x-routstr-request-id"]
    if status == 400:
        assert body["error"]["type"] == "invalid_model"
    provider.fail_status = None
    assert chat(http).status_code == 200
    assert balance(http)["total_requests"] == 1


def test_openai_client_raises_on_injected_rate_limit(provider):
    provider.fail_status = 429
    client = openai.OpenAI(base_url=provider.url, api_key=KEY, max_retries=0, timeout=5)
    with pytest.raises(openai.RateLimitError) as error:
        client.chat.completions.create(model="llama3:8b", messages=MESSAGES)
    assert error.value.code == "rate_limit_exceeded"


def test_hang_never_answers_and_stop_closes_the_connection(provider, http):
    provider.hang = True
    with pytest.raises(httpx.ReadTimeout):
        http.post("/chat/completions", headers=AUTH, json={"model": "llama3:8b", "messages": MESSAGES},
                  timeout=0.2)
    assert len(provider.requests) == 1
    assert http.get("/models").status_code == 200  # only chat completions hang
    with socket.create_connection(("127.0.0.1", provider.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        deadline = time.monotonic() + 5
        while len(provider.requests) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(provider.requests) == 3  # hanging inside the server, not waiting to be accepted
        provider.stop()
        assert sock.recv(100) == b""


def test_latency_delays_the_answer(provider, http):
    provider.latency = 0.5
    with pytest.raises(httpx.ReadTimeout):
        http.post("/chat/completions", headers=AUTH, json={"model": "llama3:8b", "messages": MESSAGES},
                  timeout=0.05)


@pytest.mark.parametrize("cut_after", [0, 2, 4])
def test_cut_stream_leaves_an_incomplete_body_and_charges_nothing(provider, http, cut_after):
    provider.reply = "a b c d"
    provider.cut_stream_after = cut_after
    received: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        with http.stream("POST", "/chat/completions", headers=AUTH,
                         json={"model": "llama3:8b", "messages": MESSAGES, "stream": True}) as answer:
            received.extend(line for line in answer.iter_lines() if line)
    assert answer.status_code == 200
    contents = [json.loads(line.removeprefix("data: "))["choices"][0]["delta"]["content"] for line in received]
    assert contents == ["a ", "b ", "c ", "d "][:cut_after]
    assert ledger(http) == (INITIAL_BALANCE_MSATS, 0, 0, 0)


def test_omit_usage_drops_every_cost(provider, http):
    provider.omit_usage = True
    answer = chat(http)
    assert header_names(answer) == ["date", "server", "date", "content-type", "content-length",
                                    "x-routstr-request-id"]
    assert set(answer.json()) == {"id", "object", "created", "model", "choices", "provider"}
    streamed = chat(http, stream=True).text
    assert "usage" not in streamed and "cost" not in streamed
    assert sse_events(streamed)[-1] == "[DONE]"


def test_x_cashu_payment_gets_change_and_a_refund_on_failure(provider, http):
    paid = {"x-cashu": "cashuBfake.payment.token.for.tests"}  # not ecash
    first, second = chat(http, headers=paid), chat(http, headers=paid)
    assert (first.status_code, second.status_code) == (200, 200)
    changes = {first.headers["x-cashu"], second.headers["x-cashu"]}
    assert len(changes) == 2 and paid["x-cashu"] not in changes
    assert all(re.fullmatch(r"cashuB[A-Za-z0-9_-]{41,}", change) for change in changes)
    provider.fail_status = 502
    refused = chat(http, headers=paid)
    assert refused.status_code == 502 and refused.headers["x-cashu"].startswith("cashuB")
    provider.fail_status = None
    garbage = chat(http, headers={"x-cashu": "not-a-token"})
    assert garbage.status_code == 401 and "x-cashu" not in garbage.headers


def test_requests_are_recorded_as_received(provider, http):
    http.post("/chat/completions?trace=1", headers={**AUTH, "X-Custom": "yes"},
              json={"model": "llama3:8b", "messages": MESSAGES})
    http.get("/info")
    chat_request, info_request = provider.requests
    assert (chat_request.method, chat_request.path) == ("POST", "/v1/chat/completions?trace=1")
    assert ("x-custom", "yes") in chat_request.headers
    assert chat_request.header("Authorization") == f"Bearer {KEY}" and chat_request.header("missing") is None
    assert chat_request.json()["messages"] == MESSAGES
    assert (info_request.method, info_request.path, info_request.body) == ("GET", "/v1/info", b"")
    provider.clear_requests()
    assert provider.requests == []


def test_info_and_unknown_routes(provider, http):
    info = http.get("/info").json()
    assert list(info) == ["name", "description", "version", "npub", "mints", "http_url", "onion_url"]
    assert (info["name"], info["version"], info["http_url"]) == ("alpha", "0.4.5", f"http://127.0.0.1:{provider.port}")
    assert re.fullmatch(r"npub1[02-9ac-hj-np-z]{58}", info["npub"])
    missing = http.get("/v2/anything")
    assert (missing.status_code, missing.json()) == (404, {"detail": "Not Found"})
    wrong_method = http.get("/chat/completions")
    assert (wrong_method.status_code, wrong_method.json()) == (405, {"detail": "Method Not Allowed"})
    assert wrong_method.headers["allow"] == "POST"


def test_chunked_request_bodies_are_read(http):
    body = json.dumps({"model": "llama3:8b", "messages": MESSAGES}).encode()
    answer = http.post("/chat/completions", headers=AUTH, content=iter([body[:10], body[10:]]))
    assert answer.status_code == 200 and answer.json()["usage"]["prompt_tokens"] == 13


@pytest.mark.parametrize("garbage", [
    b"\x00\x01\x02 nonsense\r\n\r\n",
    b"GET /v1/models HTTP/9.9\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nno colon here\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
])
def test_garbage_gets_400_and_the_server_keeps_serving(provider, garbage):
    with socket.create_connection(("127.0.0.1", provider.port), timeout=5) as sock:
        sock.sendall(garbage)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    with httpx.Client(base_url=provider.url) as http:
        assert http.get("/models").status_code == 200


def test_keep_alive_serves_requests_in_sequence_on_one_connection(provider):
    request = b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", provider.port), timeout=5) as sock:
        sock.sendall(request * 3)
        received = b""
        while received.count(b'"onion_url":null}') < 3:
            received += sock.recv(65536)
    assert received.count(b"HTTP/1.1 200 OK\r\n") == 3


def test_http_1_0_gets_answers_that_end_with_the_connection(provider):
    body = json.dumps({"model": "llama3:8b", "messages": MESSAGES, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", provider.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nAuthorization: Bearer sk-a\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, payload = received.split(b"\r\n\r\n", 1)
    assert b"connection: close" in head and b"Transfer-Encoding" not in head
    assert sse_events(payload.decode())[-1] == "[DONE]"


def test_fifty_concurrent_requests_on_keep_alive_connections(provider):
    async def fifty() -> list[httpx.Response]:
        # One event loop, not threads: httpx's sync pool has races of its own under threads.
        limits = httpx.Limits(max_connections=10, max_keepalive_connections=10)
        async with httpx.AsyncClient(base_url=provider.url, headers=AUTH, limits=limits, timeout=10) as http:
            return await asyncio.gather(*(
                http.post("/chat/completions", json={"model": "llama3:8b", "stream": index % 2 == 1,
                                                     "messages": [{"role": "user", "content": f"n{index}"}]})
                for index in range(50)))

    answers = asyncio.run(fifty())
    assert [answer.status_code for answer in answers] == [200] * 50
    assert sum(answer.text.endswith("data: [DONE]\n\n") for answer in answers) == 25
    with httpx.Client(base_url=provider.url) as http:
        # Each: 5 prompt tokens (15.15 -> 16 msats) + 3 completion tokens (9.09 -> 10); no fee billed.
        assert ledger(http) == (INITIAL_BALANCE_MSATS - 50 * 26, 0, 50 * 26, 50)


def test_stop_frees_the_port(start):
    provider = start()
    port = provider.port
    provider.stop()
    provider.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    again = start(port=port)
    assert again.port == port
    with httpx.Client(base_url=again.url) as http:
        assert http.get("/models").status_code == 200


def test_context_manager_starts_and_stops():
    with MockProvider("ctx") as provider:
        port = provider.port
        assert httpx.get(f"{provider.url}/info").json()["name"] == "ctx"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_command_line_serves_until_interrupted():
    command = [sys.executable, "-m", "arbstr.mock", "--name", "cli", "--model", "llama3:8b:0.001:0.002"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url)
        model = httpx.get(f"{url}/models").json()["data"][0]
        assert (model["id"], model["sats_pricing"]["prompt"], model["sats_pricing"]["completion"]) == (
            "llama3:8b", 0.001, 0.002)
        process.send_signal(signal.SIGINT)
        assert process.wait(5) == 0
    finally:
        process.kill()
        process.wait()
