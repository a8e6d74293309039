"""Breaker transitions with a hand-driven clock."""

from __future__ import annotations

import pytest

from arbstr.health import HealthBook


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def book(clock):
    return HealthBook(["a", "b"], failure_threshold=3, cooldown=30, funds_cooldown=300, probe_timeout=10,
                      clock=clock, wall_clock=clock)


def down(book, model="m"):
    return book.unavailable(model, ["a", "b"])


class TestBreaker:
    def test_opens_after_n_consecutive_failures(self, book):
        for _ in range(2):
            book.record_failure("a", "m", "HTTP 503")
        assert down(book) == {} and book.state("a") == "up"
        book.record_failure("a", "m", "HTTP 503")
        assert "circuit open for m after 3 failures (last: HTTP 503)" == down(book)["a"]
        assert book.state("a") == "degraded"

    def test_a_success_resets_the_count(self, book):
        for _ in range(2):
            book.record_failure("a", "m", "x")
        book.record_success("a", "m")
        book.record_failure("a", "m", "x")
        assert down(book) == {}

    def test_refused_connection_opens_at_once_for_every_model(self, book):
        book.record_failure("a", "m", "connection refused", connection=True, open_now=True)
        assert "a" in down(book, "m") and "a" in down(book, "other")
        assert book.state("a") == "open"

    def test_model_breaker_leaves_other_models_alone(self, book):
        for _ in range(3):
            book.record_failure("a", "m", "HTTP 500")
        assert "a" in down(book, "m") and down(book, "other") == {}

    def test_half_open_lets_one_probe_through_then_closes_on_success(self, book, clock):
        book.record_failure("a", None, "refused", connection=True, open_now=True)
        clock.now += 29
        assert "a" in down(book)
        clock.now += 2
        assert down(book) == {} and down(book) == {}   # asking claims nothing
        assert book.claim("a", "m")       # the trial request, as it is sent
        assert "a" in down(book)          # others wait for it
        assert not book.claim("a", "m")
        assert book.state("a") == "half_open"
        book.record_success("a", "m")
        assert down(book) == {} and book.state("a") == "up"

    def test_a_failed_probe_opens_again_for_a_full_cooldown(self, book, clock):
        book.record_failure("a", None, "refused", connection=True, open_now=True)
        clock.now += 31
        assert book.claim("a", "m")
        book.record_failure("a", "m", "HTTP 502", connection=True)
        assert "a" in down(book)
        clock.now += 29
        assert "a" in down(book)

    def test_a_lost_probe_frees_the_slot_after_its_timeout(self, book, clock):
        book.record_failure("a", None, "refused", connection=True, open_now=True)
        clock.now += 31
        assert book.claim("a", "m")
        assert "a" in down(book)
        clock.now += 11
        assert down(book) == {}

    def test_a_trial_that_tells_nothing_gives_its_slot_back(self, book, clock):
        book.record_failure("a", None, "refused", connection=True, open_now=True)
        clock.now += 31
        assert book.claim("a", "m") and "a" in down(book)
        book.release("a", "m")            # the client left before the answer
        assert down(book) == {} and book.claim("a", "m")

    def test_a_model_breaker_half_opens_and_closes_like_the_providers(self, book, clock):
        for _ in range(3):
            book.record_failure("a", "m", "HTTP 500")
        assert not book.claim("a", "m") and book.claim("a", "other")
        clock.now += 31
        assert book.claim("a", "m") and not book.claim("a", "m")
        book.record_success("a", "m")
        assert book.claim("a", "m") and book.state("a") == "up"


class TestFunds:
    def test_402_sets_the_provider_aside_without_tripping_the_breaker(self, book, clock):
        book.record_out_of_funds("a", "HTTP 402 insufficient_balance: 6 sats required")
        assert down(book)["a"].startswith("out of funds (HTTP 402 insufficient_balance")
        assert book.state("a") == "out_of_funds"
        assert book.providers["a"].breaker.consecutive_failures == 0
        clock.now += 301
        assert down(book) == {} and book.state("a") != "out_of_funds"

    def test_a_success_ends_it_early(self, book):
        book.record_out_of_funds("a", "402")
        book.record_success("a")
        assert down(book) == {}

    def test_a_good_probe_does_not_end_it(self, book, clock):
        book.record_out_of_funds("a", "402")
        book.record_probe_success("a")    # an unfunded node still lists its models
        assert book.state("a") == "out_of_funds" and "a" in down(book)
        clock.now += 301
        assert book.state("a") == "up"


class TestAuth:
    def test_a_refused_key_sets_the_provider_aside_for_funds_cooldown(self, book, clock):
        book.record_auth_failed("a", "HTTP 401 invalid_api_key")
        assert book.state("a") == "auth_failed" and down(book)["a"].startswith("refuses arbstr's key")
        book.record_probe_success("a")
        assert book.state("a") == "auth_failed"
        clock.now += 301
        assert down(book) == {}


def test_states(book):
    assert book.state("b") == "unknown"
    book.record_success("b")
    assert book.state("b") == "up" and book.providers["b"].last_success_at == 1000.0
