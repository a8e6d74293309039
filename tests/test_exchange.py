"""The exchange's pure parts: how errors read, how attempts summarize (secrets: tests/test_redact.py);
and the plan runner's order of attempts against a mock node on loopback."""

from __future__ import annotations

import asyncio
import json

import pytest

from arbstr.engine import Engine
from arbstr.exchange import (ANSWERED, CONNECTION_FAILURES, ANSWER_FAILURES, Attempt, Dispatcher, EndState,
                             OutboundRequest, _error_fields, failures_of, summarize_attempts)

from conftest import FakeClock, chat_requests, make_config, provider_toml


@pytest.mark.parametrize("body,expected", [
    (b'{"error": {"message": "Model \'x\' not found", "type": "invalid_model", "code": 400}}',
     ("invalid_model", "Model 'x' not found")),
    (b'{"error": {"message": "no", "type": "invalid_request_error", "code": "model_not_found"}}',
     ("model_not_found", "no")),
    # An X-Cashu token too small: the amount the node reserves stays in the detail (the payment learns it).
    (b'{"detail": {"reason": "Insufficient balance", "amount_required_msat": 5}}',
     (None, "Insufficient balance (amount_required_msat 5)")),
    (b'{"error": "flat"}', (None, None)),
    (b"not json", (None, None)),
    (b"[1]", (None, None)),
])
def test_error_fields_read_openai_and_routstr_shapes(body, expected):
    assert _error_fields(body) == expected


def test_summaries_name_each_failure_once_and_leave_answers_out():
    attempts = [Attempt("a", EndState.REFUSED), Attempt("b", EndState.STATUS, 503),
                Attempt("c", EndState.OUT_OF_FUNDS, 402), Attempt("d", EndState.OK, 200)]
    assert summarize_attempts(attempts) == "a=refused; b=status 503; c=out_of_funds 402"
    assert summarize_attempts([Attempt("d", EndState.OK, 200)]) == "none"
    assert failures_of(attempts) == (("a", "refused"), ("b", "status"), ("c", "out_of_funds"))


def test_every_end_state_has_one_meaning_for_health():
    # a state counts against the provider as a connection or an answer failure, or is an answer, or
    # (client gone, model unknown, funds, key, skipped, local) is handled on its own: never two of these
    groups = [CONNECTION_FAILURES, ANSWER_FAILURES, ANSWERED]
    for state in EndState:
        assert sum(state in group for group in groups) <= 1
    assert EndState.CLIENT_GONE not in CONNECTION_FAILURES | ANSWER_FAILURES
    assert EndState.STREAM_BROKEN in ANSWER_FAILURES and EndState.NO_RESPONSE in CONNECTION_FAILURES


def test_an_error_detail_says_the_status_once():
    from arbstr.exchange import Deadlines, Exchange, KeyPayment, OutboundRequest, ProviderEndpoint
    exchange = Exchange(None, ProviderEndpoint("p", "http://h/v1", "sk-provider-key-000000"),
                        OutboundRequest("/chat/completions", b"{}", (), "m", False), Deadlines(1, 1, 1, 1), None,
                        KeyPayment("sk-provider-key-000000"))
    exchange.status = 503
    assert exchange._detail("503", "Upstream request failed") == "HTTP 503: Upstream request failed"
    assert exchange._detail("upstream_error", "no") == "HTTP 503 upstream_error: no"


class _CapsEveryoneBut:
    """A request's budget whose caps pass over every provider but one (what arbstr.budgets does
    when those providers' own caps are reached)."""

    def __init__(self, allowed: str) -> None:
        self.allowed = allowed

    async def admit(self, candidate) -> str | None:
        return None if candidate.provider == self.allowed else f"budget {candidate.provider}-cap reached"

    def release(self) -> None:
        pass


def test_providers_passed_over_for_their_caps_leave_the_last_candidate_its_last_chance(start_provider):
    node = start_provider("b", ["m"], 0.001, 0.001)
    config = make_config(provider_toml("a", "http://127.0.0.1:9/v1", ["m"], 1, 1),
                         provider_toml("b", node.url, ["m"], 2, 2), extra="[routing]\nhealth_interval = 0\n")
    engine = Engine(config)
    clock = FakeClock(1000.0)
    engine.health.clock = clock
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    decision = engine.decide("r1", body, None)
    assert [c.provider for c in decision.plan.candidates] == ["a", "b"]
    # Meanwhile b's breaker opened, cooled down, and another request took its one trial.
    engine.health.record_failure("b", None, "refused", connection=True, open_now=True)
    clock.now += config.routing.cooldown + 1
    assert engine.health.claim("b", "m")

    async def send():
        dispatcher = Dispatcher(engine.endpoints, engine.deadlines, engine.health)
        try:
            answer = await dispatcher.send(decision.plan, OutboundRequest("/chat/completions", body, (), "m", False),
                                           budget=_CapsEveryoneBut("b"))
            return answer.exchange.status, [(a.provider, a.state) for a in answer.attempts]
        finally:
            await dispatcher.aclose()
    status, attempts = asyncio.run(send())
    assert status == 200 and attempts == [("a", EndState.BUDGET)]  # and b answered, its trial taken or not
    assert len(chat_requests(node)) == 1
