"""Which app a request is attributed to, source by source, most explicit first."""

from __future__ import annotations

import pytest

from arbstr.attribution import MAX_APP_LENGTH, app_of


def lookup(**headers: str):
    lowered = {k.replace("_", "-").lower(): v for k, v in headers.items()}
    return lambda name: lowered.get(name.lower())


@pytest.mark.parametrize("headers, token, app", [
    ({"x_arbstr_app": "notes", "x_title": "Other", "user_agent": "curl/8"}, "team", "notes"),
    ({"x_title": "My Agent", "http_referer": "https://agent.example/x", "user_agent": "curl/8"}, "team", "My Agent"),
    ({"http_referer": "https://agent.example:8443/page?q=1", "user_agent": "curl/8"}, "team", "agent.example"),
    ({"http_referer": "not a url"}, None, "not a url"),
    ({"user_agent": "OpenAI/Python 1.55.0"}, "team", "OpenAI"),
    ({"user_agent": "curl/8.5.0"}, None, "curl"),
    ({}, "team", "team"),
    ({}, None, None),
    ({"x_arbstr_app": "   ", "user_agent": "  "}, "team", "team"),
])
def test_the_most_explicit_source_wins(headers, token, app):
    assert app_of(lookup(**headers), token) == app


def test_names_are_cut_to_the_ledger_column_and_control_characters_go():
    assert app_of(lookup(x_arbstr_app="a\x00b\tc")) == "a b c"
    assert app_of(lookup(x_arbstr_app="x" * 500)) == "x" * MAX_APP_LENGTH
