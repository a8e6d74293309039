"""What a flow shows of a routed request: comments, the request as sent, failed attempts, copies."""

from __future__ import annotations

from decimal import Decimal

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from arbstr.flowview import (AttemptView, BoundedCopy, RouteSummary, UntilShown, attempt_comment, attempt_flow,
                             route_comment, show_local, show_sent, show_server, shown)

MASKED = "[provider credential]"
SENT = ((b"content-type", b"application/json"), (b"authorization", MASKED.encode()))
CHEAP_503 = AttemptView("cheapfail", "http://127.0.0.1:9001/v1/chat/completions", "status", 503,
                        "HTTP 503: upstream overloaded")
DEAD = AttemptView("dead", "http://127.0.0.1:1/v1/chat/completions", "refused", None, "connection refused")
OK = AttemptView("dear", "https://dear.example/v1/chat/completions", "ok", 200)


class TestRouteComment:
    def test_cost_saving_and_failover_in_one_line(self):
        route = RouteSummary("gpt-4o", "dear", [CHEAP_503, OK], cost_sats=Decimal("0.72"),
                             next_best_sats=Decimal("0.84"))
        assert route_comment(route) == "gpt-4o → dear 0.72 sats (saved 0.12) after cheapfail 503"

    def test_estimate_until_settled_and_every_failure_named(self):
        route = RouteSummary("gpt-4o", "dear", [DEAD, CHEAP_503, OK], estimated_sats=Decimal("0.0251"))
        assert route_comment(route) == "gpt-4o → dear ~0.025 sats estimated after dead refused, cheapfail 503"

    def test_no_saving_shown_when_nothing_was_saved(self):
        route = RouteSummary("gpt-4o", "dear", [OK], cost_sats=Decimal("1"), next_best_sats=Decimal("1"))
        assert route_comment(route) == "gpt-4o → dear 1 sats"

    def test_an_error_after_the_answer_began(self):
        route = RouteSummary("gpt-4o", "dear", [OK], cost_sats=Decimal("0.5"), error="stream_broken: cut")
        assert route_comment(route) == "gpt-4o → dear 0.5 sats; stream_broken: cut"

    def test_every_provider_failed(self):
        route = RouteSummary("gpt-4o", None, [DEAD, CHEAP_503], error="upstream_error")
        assert route_comment(route) == "gpt-4o ✗ no provider answered: dead refused, cheapfail 503"

    def test_other_states_keep_their_status(self):
        assert AttemptView("p", "http://x/v1", "OUT_OF_FUNDS", 402).reason == "out_of_funds 402"
        assert AttemptView("p", "http://x/v1", "STATUS", 429).reason == "429"
        assert AttemptView("p", "http://x/v1", "HEADER_TIMEOUT").reason == "header_timeout"


def test_the_request_shown_is_the_one_sent():
    flow = tflow.tflow()
    flow.request.headers["x-stainless-lang"] = "python"
    flow.request.content = b'{"model": "gpt-4o"}'
    show_sent(flow, "https://dear.example:8443/v1/chat/completions", SENT)
    assert flow.request.url == "https://dear.example:8443/v1/chat/completions"
    assert list(flow.request.headers.items()) == [("host", "dear.example:8443"), ("content-type", "application/json"),
                                                  ("authorization", MASKED), ("content-length", "19")]
    show_server(flow, "https://dear.example:8443/v1/chat/completions", 1.0, 2.0)
    assert flow.server_conn.address == ("dear.example", 8443) and flow.server_conn.sni == "dear.example"


def test_a_flow_answered_locally_shows_the_address_the_client_used():
    flow = tflow.tflow(req=http.Request.make("GET", "http://127.0.0.1:1/v1/models"))
    flow.client_conn.sockname = ("127.0.0.1", 8080)
    show_local(flow)
    assert flow.request.url == "http://127.0.0.1:8080/v1/models"
    assert flow.server_conn.address is None


@pytest.mark.parametrize("attempt, status, error", [(CHEAP_503, 503, None), (DEAD, None, "connection refused")])
def test_a_failed_attempt_is_a_marked_flow_of_its_own(attempt, status, error):
    client = tflow.tflow()
    view = AttemptView(attempt.provider, attempt.url, attempt.state, attempt.status, attempt.detail,
                       SENT, 10.0, 11.0)
    text = attempt_comment(view, 1, "3f2ab1c4d5e6f708", "gpt-4o")
    flow = attempt_flow(client, view, b'{"model":"gpt-4o"}', text)
    assert flow.request.url == attempt.url and flow.request.content == b'{"model":"gpt-4o"}'
    assert flow.request.headers["authorization"] == MASKED and flow.request.headers["content-length"] == "18"
    assert flow.server_conn.address[0] == "127.0.0.1" and flow.client_conn is client.client_conn
    assert (flow.response.status_code if flow.response else None) == status
    assert (flow.error.msg if flow.error else None) == error
    assert flow.marked and not flow.live and flow.id != client.id
    assert text.startswith(f"{attempt.provider} {attempt.reason}: attempt 1 for request 3f2ab1c4d5e6 (gpt-4o)")


def test_a_bounded_copy_keeps_the_start_and_says_it_is_cut():
    copy = BoundedCopy(10)
    for chunk in (b"data: 1\n", b"data: 2\n", b"data: 3\n"):
        copy.feed(chunk)
    assert copy.getvalue() == b"data: 1\nda" and copy.truncated
    whole = BoundedCopy(100)
    whole.feed(b"abc")
    assert whole.getvalue() == b"abc" and not whole.truncated


def test_a_4xx_passed_to_the_client_is_its_answer_not_a_failure():
    passed_on = AttemptView("blunt", "http://127.0.0.1:9002/v1/chat/completions", "client_error", 422)
    assert not passed_on.failed and CHEAP_503.failed and DEAD.failed
    route = RouteSummary("gpt-4o", "blunt", [CHEAP_503, passed_on], cost_sats=Decimal("0.1"))
    assert route_comment(route) == "gpt-4o → blunt 0.1 sats after cheapfail 503"


def test_a_flow_of_arbstrs_is_listed_once_shown_others_as_the_users_filter_says():
    routed, passing, recorded = tflow.tflow(), tflow.tflow(), tflow.tflow(resp=True)
    routed.live = passing.live = True
    recorded.live = False  # read from a file, or ended: nothing more will change it
    handled = {routed.id, recorded.id}
    listed = UntilShown(lambda flow: True, lambda flow: flow.id in handled)
    assert not listed(routed) and listed(passing) and listed(recorded)
    shown(routed)
    assert listed(routed)
    assert not UntilShown(lambda flow: False, lambda flow: True)(routed)  # the user's own filter still holds
    paused = tflow.tflow()
    paused.live = True
    paused.intercept()  # the user stopped it before arbstr rewrote it: they must see it to resume it
    assert UntilShown(lambda flow: True, lambda flow: True)(paused)
