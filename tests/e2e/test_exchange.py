"""Misbehaving providers through the real proxy: every client gets an answer or a JSON error within
the deadlines, a request that may have reached a provider is never sent to it again, and every
request is one ledger row with the right cost."""

from __future__ import annotations

import concurrent.futures
import os
import time
from decimal import Decimal

import httpx
import openai
import pytest

from arbstr.httpclient import IDLE_TIMEOUT
from conftest import provider_toml
from e2e.misbehaving import COMPLETION_MSATS, COST_MSATS, PROMPT_MSATS, Misbehaving
from e2e.test_ledger import wait_for_rows

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def config(bad: Misbehaving, good: Misbehaving, routing: str = "") -> str:
    # bad advertises what it bills (msats per token = sats per 1k; arbstr checks every charge against
    # it); good asks ten times as much.
    return (provider_toml("bad", bad.url, ["gpt-4o"], PROMPT_MSATS, COMPLETION_MSATS)
            + provider_toml("good", good.url, ["gpt-4o"], 10 * PROMPT_MSATS, 10 * COMPLETION_MSATS)
            + "[routing]\nhealth_interval = 0\nfailure_threshold = 1000\nrank_by_success_rate = false\n"
            + "header_timeout = 3\nbody_timeout = 1\n"
            + "stream_idle_timeout = 1\n" + routing + '[database]\npath = ":memory:"\n')


def always(action: str):
    return lambda connection, request: action


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_request_the_provider_read_is_never_sent_to_it_again(how, stream, start_proxy):
    # Each connection to `bad` answers its first request, then reads the next one and closes (FIN or
    # RST) without a byte of answer: that request may be billed, so it goes to `good`, not to `bad` again.
    with Misbehaving("bad", lambda connection, request: "ok" if request == 0 else how) as bad, \
            Misbehaving("good", always("ok")) as good:
        proxy = start_proxy("serve", config(bad, good))
        client = proxy.client()
        providers = []
        for _ in range(20):
            raw = client.chat.completions.with_raw_response.create(**CHAT, stream=stream)
            if stream:
                assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
            else:
                assert raw.parse().choices[0].message.content.startswith("Hello from")
            providers.append(raw.headers["x-arbstr-provider"])
        assert bad.posts == 20  # exactly one POST per client request, never a second
        assert good.posts == providers.count("good") == 10
        rows = wait_for_rows(proxy, 20)
        assert all(r["success"] for r in rows)
        failed_over = [r for r in rows if r["provider"] == "good"]
        assert len(failed_over) == 10 and {r["attempts"] for r in failed_over} == {"bad=no_response"}, failed_over
        assert all(Decimal(r["cost_sats"]) * 1000 == COST_MSATS for r in rows)


@pytest.mark.parametrize("action,state", [
    ("stall_error_body", "status 503"), ("stall_body", "body_timeout 200"), ("cut_body", "body_cut 200"),
    ("cut_chunk", "body_cut 200"), ("401", "auth_failed 401"), ("403", "auth_failed 403"),
])
def test_stalled_cut_and_refused_answers_fail_over_before_the_client_sees_a_byte(action, state, start_proxy):
    with Misbehaving("bad", always(action)) as bad, Misbehaving("good", always("ok")) as good:
        proxy = start_proxy("serve", config(bad, good))
        started = time.monotonic()
        raw = proxy.client().chat.completions.with_raw_response.create(**CHAT)
        assert time.monotonic() - started < 10  # the error body's 5 s or body_timeout's 1 s, not forever
        assert raw.parse().choices[0].message.content == "Hello from good"
        assert raw.headers["x-arbstr-attempts"] == f"bad={state}"
        assert bad.posts == 1 and good.posts == 1
        [row] = wait_for_rows(proxy, 1)
        assert row["success"] and row["provider"] == "good" and row["attempts"] == f"bad={state}"
        with proxy.http() as http:
            [health] = [p for p in http.get("/health").json()["providers"] if p["name"] == "bad"]
        assert health["last_error"] and health["last_error_at"]  # counted against bad
        assert health["state"] == ("auth_failed" if action in ("401", "403") else "up")
        if action in ("401", "403"):  # set aside: the next request goes straight to good
            raw = proxy.client().chat.completions.with_raw_response.create(**CHAT)
            assert raw.headers["x-arbstr-attempts"] == "none" and bad.posts == 1


def test_a_gzip_answer_and_a_json_answer_to_a_stream_are_read_for_usage(start_proxy):
    # By POST: the proxy's price reads of /v1/models come on connections of their own.
    script = {1: "gzip", 2: "json_for_stream"}
    with Misbehaving("bad", lambda connection, request: script.get(bad.posts, "ok")) as bad, \
            Misbehaving("good", always("ok")) as good:
        proxy = start_proxy("serve", config(bad, good))
        with httpx.Client(timeout=10) as http:
            zipped = http.post(f"{proxy.url}/v1/chat/completions", json=CHAT)
            assert zipped.json()["choices"][0]["message"]["content"] == "Hello from bad"  # decoded by httpx
            plain = http.post(f"{proxy.url}/v1/chat/completions", json={**CHAT, "stream": True})
            assert plain.headers["content-type"] == "application/json" and plain.json()["usage"]
        rows = wait_for_rows(proxy, 2)
        for row in rows:
            assert row["success"] and not row["usage_estimated"] and row["output_tokens"] == 5
            assert Decimal(row["cost_sats"]) * 1000 == COST_MSATS


@pytest.mark.parametrize("action", ["stream_stall", "stream_break"])
def test_a_stream_that_stalls_or_breaks_ends_and_counts_against_the_provider(action, start_proxy):
    with Misbehaving("bad", always(action)) as bad, Misbehaving("good", always("ok")) as good:
        proxy = start_proxy("serve", config(bad, good, "failure_threshold = 2\n").replace(
            "failure_threshold = 1000\n", ""))
        client = proxy.client()
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises((openai.APIError, httpx.HTTPError)):
                for _ in client.chat.completions.create(**CHAT, stream=True):
                    pass
            assert time.monotonic() - started < 10
        rows = wait_for_rows(proxy, 2)
        kind = "stream_idle" if action == "stream_stall" else "stream_broken"
        assert all(not r["success"] and r["error"].startswith(kind) for r in rows)
        # two broken streams opened bad's breaker: the next request goes to good
        raw = client.chat.completions.with_raw_response.create(**CHAT, stream=True)
        assert raw.headers["x-arbstr-provider"] == "good" and bad.posts == 2


def test_no_attempt_starts_for_a_client_that_left(start_proxy):
    with Misbehaving("bad", always("stall_headers")) as bad, Misbehaving("good", always("ok")) as good:
        proxy = start_proxy("serve", config(bad, good).replace("header_timeout = 3", "header_timeout = 1.5"))
        with httpx.Client(timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
            http.post(f"{proxy.url}/v1/chat/completions", json=CHAT)
        [row] = wait_for_rows(proxy, 1)
        assert row["error"] == "client_disconnected" and row["attempts"] == "bad=header_timeout"
        assert bad.posts == 1 and good.posts == 0


def test_no_descriptor_leaks_after_300_stalled_requests(start_proxy):
    with Misbehaving("bad", always("stall_body")) as bad, Misbehaving("good", always("ok")) as good:
        proxy = start_proxy("serve", config(bad, good).replace("body_timeout = 1", "body_timeout = 0.2"))
        fds = f"/proc/{proxy.process.pid}/fd"
        with httpx.Client(timeout=10) as http:
            assert http.post(f"{proxy.url}/v1/chat/completions", json=CHAT).status_code == 200
            before = len(os.listdir(fds))

            def one(_: int) -> int:
                return http.post(f"{proxy.url}/v1/chat/completions", json=CHAT).status_code

            with concurrent.futures.ThreadPoolExecutor(30) as pool:
                statuses = list(pool.map(one, range(300)))
            assert statuses == [200] * 300 and bad.posts == 301 and good.posts == 301
            time.sleep(IDLE_TIMEOUT + 0.5)  # the 30 connections pooled to good expire...
            assert http.post(f"{proxy.url}/v1/chat/completions", json=CHAT).status_code == 200  # ...and go
        deadline = time.monotonic() + 5  # the proxy sees the client connections close
        while len(os.listdir(fds)) > before + 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        links = [os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)]
        assert len(links) <= before + 3 and bad.open_connections == 0, links
