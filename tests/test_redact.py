"""Secrets out of provider-supplied text: configured ones and anything shaped like one."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arbstr.redact import REDACTED, redact, redact_bytes, redact_fields, remember

CONFIGURED = "plain-configured-secret-4711"


@pytest.fixture(autouse=True)
def configured_secret():
    remember([CONFIGURED, "", None, "abc"])


@pytest.mark.parametrize("text,secret", [
    (f"invalid key {CONFIGURED}, try again", CONFIGURED),
    ("Invalid API key sk-abcdef0123456789xyz provided", "sk-abcdef0123456789xyz"),
    # Fakes shaped like tokens, worth nothing: the cashuA one decodes to {"token":[{"mint":
    # "https://mint.example"}]} (no proofs), the cashuB one is a CBOR prefix cut off before any proof.
    ("token cashuAeyJ0b2tlbiI6W3sibWludCI6Imh0dHBzOi8vbWludC5leGFtcGxlIn1dfQ== was spent",
     "cashuAeyJ0b2tlbiI6W3sibWludCI6Imh0dHBzOi8vbWludC5leGFtcGxlIn1dfQ=="),
    ("you sent: cashuBo2F0gaJhaUgA_9SLj17PgGFwgaNhYQFhc3hAZmY2Yzc-", "cashuBo2F0gaJhaUgA_9SLj17PgGFwgaNhYQFhc3hAZmY2Yzc-"),
    ("you sent: Bearer opaque.token.value", "opaque.token.value"),
    ("you sent: bearer opaque.token.value", "opaque.token.value"),
    (f'{{"detail": "{CONFIGURED}"}}', CONFIGURED),
])
def test_secrets_and_secret_shapes_are_replaced(text, secret):
    cleaned = redact(text)
    assert secret not in cleaned and REDACTED in cleaned
    assert secret.encode() not in redact_bytes(text.encode())
    assert redact(cleaned) == cleaned  # nothing left to find


@pytest.mark.parametrize("text", [
    "HTTP 503 upstream_error: Upstream request failed", "task-force", "risk-taking", "Bearer", "abc of it",
    "cashu mint unreachable", "", "日本語 (é)"])
def test_ordinary_text_is_left_alone(text):
    assert redact(text) == text
    assert redact_bytes(text.encode()) == text.encode()


def test_a_secret_inside_another_is_replaced_whole():
    remember(["inner-secret-0001", "outer-inner-secret-0001-tail"])
    assert redact("x outer-inner-secret-0001-tail y") == f"x {REDACTED} y"


def test_bytes_that_are_not_utf8_are_cleaned_without_decoding():
    assert redact_bytes(b"\xe9\xff " + CONFIGURED.encode() + b" \x00") == b"\xe9\xff " + REDACTED.encode() + b" \x00"


def test_a_secret_given_with_the_text_is_replaced_too():
    assert redact("bad key opaque-unremembered-key-42", also=["opaque-unremembered-key-42", ""]) == f"bad key {REDACTED}"


@pytest.mark.parametrize("fields", [
    [(b"content-type", b"application/json"), (b"date", b"Mon, 30 Nov 2026 19:04:17 GMT")],
    [(b"x-note", f"invalid key {CONFIGURED}".encode()), (b"server", b"uvicorn")],
    [(b"server", b"uvicorn"), (b"www-authenticate", b"Bearer opaque.token.value")],
    # Halves of a secret's shape in two values, and a value that ends where the next begins: each
    # value is judged alone, as redact_bytes judges it.
    [(b"a", b"sk-"), (b"b", b"abcdef0123456789")],
    [(b"a", b"Bearer "), (b"b", b"opaque.token.value")],
    [(b"a", b"Bearer [REDAC"), (b"b", b"TED]")],
    [(b"a", b"cashuA"), (b"b", b"eyJ0b2tlbiI6W3sibWludCI6")],
    [],
])
def test_header_values_are_redacted_one_by_one(fields):
    assert redact_fields(fields) == [(name, redact_bytes(value)) for name, value in fields]


_SECRETISH = st.lists(st.sampled_from([b"sk-", b"Bearer ", b"bEaReR ", b"cashuA", b"cashuB", b"[REDACTED]", b"abcdef",
                                       b"0123456789", b"-", b" ", b",", b"\n", CONFIGURED.encode(), b"plain-",
                                       b"\xc3\xa9", b"x"]), max_size=12).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"a", b"server", b"www-authenticate"]), _SECRETISH), max_size=5))
def test_the_quick_look_never_passes_over_a_value_redact_would_change(fields):
    # The look before the regex only saves work: every value the pattern would change is still redacted.
    assert redact_fields(fields) == [(name, redact_bytes(value)) for name, value in fields]
