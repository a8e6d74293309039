"""The exchange's pure parts: how errors read, how attempts summarize (secrets: tests/test_redact.py)."""

from __future__ import annotations

import pytest

from arbstr.exchange import (ANSWERED, CONNECTION_FAILURES, ANSWER_FAILURES, Attempt, EndState, _error_fields,
                             failures_of, summarize_attempts)


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
