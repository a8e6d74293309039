from decimal import Decimal

import pytest

from arbstr.config import parse_config
from arbstr.errors import InvalidRequest, UnknownPolicy
from arbstr.policy import DEFAULT_POLICY, NO_PINNING, KeywordClassifier, Pinning, Policy, PolicyBook, parse_pinning

from conftest import provider_toml

RULES = provider_toml("a", "https://a.example", ["m"], 1, 1) + """
[policies]
default_strategy = "lowest_cost"

[[policies.rules]]
name = "code"
keywords = ["python", "C++", "refactor"]
max_sats_per_1k_output = 10

[[policies.rules]]
name = "cheap"
keywords = ["summarize", "python"]
strategy = "cheapest"
"""


@pytest.fixture
def book() -> PolicyBook:
    return PolicyBook.from_config(parse_config(RULES, environ={}).policies)


class TestSelect:
    def test_header_names_a_rule(self, book):
        assert book.select("cheap", "python please").name == "cheap"

    def test_header_may_name_the_default(self, book):
        assert book.select("default", "python").name == DEFAULT_POLICY

    def test_unknown_header_lists_known_policies(self, book):
        with pytest.raises(UnknownPolicy) as err:
            book.select("fast", "")
        assert err.value.status == 400
        assert "cheap, code, default" in err.value.message

    def test_first_matching_rule_in_config_order(self, book):
        assert book.select(None, "please summarize this python file").name == "code"

    def test_keywords_match_whole_words_ignoring_case(self, book):
        assert book.select(None, "Write PYTHON.").name == "code"
        assert book.select(None, "pythonic ideas").name == DEFAULT_POLICY
        assert book.select(None, "a C++ question").name == "code"
        assert book.select(None, "Summarize: x").name == "cheap"

    def test_default_when_nothing_matches(self, book):
        policy = book.select(None, "hello there")
        assert policy == Policy(DEFAULT_POLICY, "cheapest")

    def test_rule_inherits_default_strategy(self, book):
        assert book.by_name["code"].strategy == "cheapest"
        assert str(book.by_name["code"].max_sats_per_1k_output) == "10"


class TestClassifierInterface:
    def test_a_custom_classifier_replaces_keywords(self):
        class Always:
            def classify(self, text: str) -> str | None:
                return "smart"
        smart = Policy("smart", "cheapest")
        book = PolicyBook([smart], Policy(DEFAULT_POLICY, "cheapest"), classifier=Always())
        assert book.select(None, "anything") is smart

    def test_keyword_classifier_alone(self):
        classifier = KeywordClassifier([Policy("x", "cheapest", keywords=("hello world",))])
        assert classifier.classify("say Hello World!") == "x"
        assert classifier.classify("hello") is None


class TestPinningHeaders:
    KNOWN = ("alpha", "beta")

    def test_names_and_fallback(self):
        assert parse_pinning(None, None, self.KNOWN) == NO_PINNING
        assert parse_pinning(" alpha , beta", "None", self.KNOWN) == Pinning(frozenset({"alpha", "beta"}), False)
        assert parse_pinning(None, "any", self.KNOWN) == Pinning(None, True)

    @pytest.mark.parametrize("provider, fallback, code", [
        ("gamma", None, "unknown_provider"), (" , ", None, "unknown_provider"), ("alpha", "never", "invalid_fallback")])
    def test_bad_values_are_400s_that_name_the_header(self, provider, fallback, code):
        with pytest.raises(InvalidRequest) as err:
            parse_pinning(provider, fallback, self.KNOWN)
        assert err.value.code == code and err.value.status == 400
        assert err.value.details["param"] in ("X-Arbstr-Provider", "X-Arbstr-Fallback")
        if code == "unknown_provider":
            assert "known providers: alpha, beta" in err.value.message

    def test_a_rule_names_its_providers_fallback_and_ratio(self):
        config = parse_config(provider_toml("a", "https://a.example", ["m"], 1, 1) + """
[[policies.rules]]
name = "pinned"
providers = ["a"]
allow_fallback = false
max_price_ratio = 1.5
""", environ={})
        policy = PolicyBook.from_config(config.policies).by_name["pinned"]
        assert (policy.providers, policy.allow_fallback, policy.max_price_ratio) == (frozenset({"a"}), False, Decimal("1.5"))
