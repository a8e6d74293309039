from decimal import Decimal

import pytest

from arbstr.config import load_config, mask_secret, normalize_base_url, parse_config
from arbstr.errors import ConfigError
from arbstr.pricing import Rates

from conftest import make_config, provider_toml

ALPHA = provider_toml("alpha", "https://alpha.example/v1", ["gpt-4o"], 3.03, 6)


def problems(text: str, environ=None) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, environ=environ or {})
    return err.value.problems


class TestValid:
    def test_minimal(self):
        config = parse_config(ALPHA, environ={})
        provider = config.providers[0]
        assert provider.input_rate == Decimal("3.03")  # exactly what the user wrote
        assert provider.base_fee == Decimal(0)
        assert config.server.listen == "127.0.0.1:8080"
        assert config.policies.default_strategy == "cheapest"

    def test_lowest_cost_is_an_alias(self):
        config = parse_config(ALPHA + '[policies]\ndefault_strategy = "lowest_cost"\n', environ={})
        assert config.policies.default_strategy == "cheapest"

    @pytest.mark.parametrize("url,expected", [
        ("https://h.example", "https://h.example/v1"),
        ("https://h.example/", "https://h.example/v1"),
        ("https://h.example/v1/", "https://h.example/v1"),
        ("http://127.0.0.1:9000/v1", "http://127.0.0.1:9000/v1"),
        ("https://h.example/api", "https://h.example/api/v1"),
    ])
    def test_url_gets_v1(self, url, expected):
        assert normalize_base_url(url) == expected

    def test_key_from_variable_reference(self):
        text = ALPHA.replace('api_key = "sk-alpha-0123456789abcdef"', 'api_key = "${ALPHA_KEY}"')
        config = parse_config(text, environ={"ALPHA_KEY": "sk-from-env-123456"})
        assert config.providers[0].api_key.get_secret_value() == "sk-from-env-123456"

    def test_key_from_arbstr_variable_when_absent(self):
        text = provider_toml("my-node", "https://n.example", ["m"], 1, 1).replace(
            'api_key = "sk-my-node-0123456789abcdef"\n', "")
        config = parse_config(text, environ={"ARBSTR_MY_NODE_API_KEY": "cashuAabc"})
        assert config.providers[0].api_key.get_secret_value() == "cashuAabc"

    def test_database_url_overrides(self):
        config = parse_config(ALPHA, environ={"DATABASE_URL": "sqlite:///tmp/x.db"})
        assert config.database.path == "sqlite:///tmp/x.db"

    def test_key_never_in_repr(self):
        config = parse_config(ALPHA, environ={})
        assert "sk-alpha-0123456789abcdef" not in repr(config)
        assert "sk-alpha-0123456789abcdef" not in str(config.model_dump())


class TestProblems:
    def test_unknown_key_is_named_with_its_provider(self):
        found = problems(ALPHA + "input_rat = 3\n")
        assert found == ["providers[alpha].input_rat: unknown key (check its spelling against config.example.toml)"]

    def test_every_problem_is_listed(self):
        text = (provider_toml("alpha", "ftp://x", [], -1, 2) + 'pricing = "config"\n' + "\n[server]\nlisten = \"nowhere\"\n"
                '[policies]\ndefault_strategy = "fastest"\n')
        found = problems(text)
        joined = "\n".join(found)
        assert "providers[alpha].url" in joined
        assert "providers[alpha].models" in joined
        assert "providers[alpha].input_rate" in joined
        assert "server.listen" in joined
        assert "policies.default_strategy: unknown strategy 'fastest'" in joined
        assert len(found) == 5

    def test_missing_variable(self):
        text = ALPHA.replace('"sk-alpha-0123456789abcdef"', '"${NOPE}"')
        assert problems(text) == ["providers[alpha].api_key: environment variable NOPE is not set"]

    def test_absent_key_without_variable(self):
        text = ALPHA.replace('api_key = "sk-alpha-0123456789abcdef"\n', "")
        assert problems(text) == ["providers[alpha].api_key: not set; set api_key or export ARBSTR_ALPHA_API_KEY"]

    def test_missing_required_key(self):
        assert problems(ALPHA.replace("output_rate = 6\n", "")) == [
            "providers[alpha].output_rate: is required with input_rate"]

    def test_duplicate_provider_names(self):
        assert any("two providers are named 'alpha'" in p for p in problems(ALPHA + ALPHA))

    def test_unknown_rule_strategy_and_key(self):
        text = ALPHA + '[[policies.rules]]\nname = "code"\nstrategy = "random"\nkeyword = ["x"]\n'
        joined = "\n".join(problems(text))
        assert "policies.rules[code].strategy: unknown strategy 'random'" in joined
        assert "policies.rules[code].keyword: unknown key" in joined

    def test_rule_cannot_take_the_default_name(self):
        assert any("reserved" in p for p in problems(ALPHA + '[[policies.rules]]\nname = "default"\n'))

    def test_no_providers(self):
        assert problems("") == ["providers: is required"]

    def test_not_toml(self):
        assert problems("[[providers]\n")[0].startswith("not valid TOML")

    def test_boolean_is_not_a_rate(self):
        assert any("input_rate" in p for p in problems(ALPHA.replace("input_rate = 3.03", "input_rate = true")))

    def test_missing_file(self, tmp_path):
        with pytest.raises(ConfigError) as err:
            load_config(tmp_path / "nope.toml")
        assert "file not found" in err.value.problems[0]


class TestMask:
    def test_shows_only_kind_and_tail(self):
        assert mask_secret("sk-abcdefghijklmnop1234") == "sk-…1234"
        assert mask_secret("cashuBo2FteCJodHRwczovL21pbnQ") == "cashu…pbnQ"
        assert mask_secret("short") == "****"


class TestClientTokens:
    def test_named_tokens_literal_or_from_the_environment(self):
        config = parse_config(ALPHA + '[[server.tokens]]\nname = "ci"\ntoken = "tok-ci-000000"\n'
                              '[[server.tokens]]\nname = "lab"\ntoken = "${LAB_TOKEN}"\n',
                              environ={"LAB_TOKEN": "tok-lab-111111"})
        assert [(t.name, t.token.get_secret_value()) for t in config.server.tokens] == [
            ("ci", "tok-ci-000000"), ("lab", "tok-lab-111111")]
        assert config.server.requires_token

    def test_duplicates_empty_and_unset_tokens_are_named(self):
        assert problems(ALPHA + '[[server.tokens]]\nname = "ci"\ntoken = "same-value"\n'
                        '[[server.tokens]]\nname = "ci"\ntoken = "other-value"\n') == [
            "server: server.tokens: two tokens are named 'ci'; names must be unique"]
        assert problems(ALPHA + '[[server.tokens]]\nname = "a"\ntoken = "v"\n[[server.tokens]]\nname = "b"\ntoken = "v"\n') == [
            "server: server.tokens: two tokens have the same value, so a request could not say which it is"]
        assert problems(ALPHA + '[[server.tokens]]\nname = "a"\ntoken = "${NOPE}"\n') == [
            "server.tokens[a].token: environment variable NOPE is not set"]
        assert problems(ALPHA + '[[server.tokens]]\nname = "a"\ntoken = " "\n') == ["server.tokens[a].token: is empty"]


class TestWalletPayment:
    BARE = '[[providers]]\nname = "n"\nurl = "https://n.example"\nmodels = ["m"]\ninput_rate = 1\noutput_rate = 1\n'
    WALLET = '[wallet]\nmints = ["https://mint.example/"]\n'

    def test_without_a_key_a_provider_is_paid_from_the_wallet(self):
        config = parse_config(self.BARE + self.WALLET, environ={})
        assert config.payment_of(config.providers[0]) == "wallet"
        assert config.wallet.mints == ["https://mint.example"] and config.wallet.refund_after == 600

    def test_a_key_means_key_payment_unless_told_otherwise(self):
        with_key = self.BARE.replace("models", 'api_key = "sk-x"\nmodels')
        config = parse_config(with_key + self.WALLET, environ={})
        assert config.payment_of(config.providers[0]) == "key"
        told = parse_config(with_key.replace("models", 'payment = "xcashu"\nmodels') + self.WALLET, environ={})
        assert told.payment_of(told.providers[0]) == "xcashu"

    def test_wallet_payment_needs_a_wallet_and_key_payment_a_key(self):
        with pytest.raises(ConfigError) as no_wallet:
            parse_config(self.BARE.replace("models", 'payment = "wallet"\nmodels'), environ={})
        assert "no [wallet] section" in no_wallet.value.message
        with pytest.raises(ConfigError) as no_key:
            parse_config(self.BARE.replace("models", 'payment = "key"\nmodels') + self.WALLET, environ={})
        assert "providers[n].api_key: not set" in no_key.value.message
        with pytest.raises(ConfigError) as bad:
            parse_config(self.BARE.replace("models", 'payment = "cash"\nmodels') + self.WALLET, environ={})
        assert "providers[n].payment" in bad.value.message

    def test_mints_must_be_urls(self):
        with pytest.raises(ConfigError) as bad:
            parse_config(self.BARE + '[wallet]\nmints = ["mint.example"]\n', environ={})
        assert "wallet.mints" in bad.value.message
        with pytest.raises(ConfigError):
            parse_config(self.BARE + '[wallet]\nmints = []\n', environ={})


def test_a_rule_naming_an_unknown_provider_or_a_ratio_below_one_is_named():
    assert problems(ALPHA + '[[policies.rules]]\nname = "r"\nproviders = ["zeta"]\n') == [
        "(top level): policies.rules[r].providers: no provider is named 'zeta'; known: alpha"]
    assert problems(ALPHA + '[[policies.rules]]\nname = "r"\nmax_price_ratio = 0.5\n') == [
        "policies.rules[r].max_price_ratio: Input should be greater than or equal to 1"]
    assert problems(ALPHA + '[[policies.rules]]\nname = "r"\nproviders = []\n')[0].startswith(
        "policies.rules[r].providers: is empty")


class TestPerModelPrices:
    TABLES = ('[[providers]]\nname = "a"\nurl = "https://a.example"\napi_key = "sk-a-0123456789abcdef"\n'
              'pricing = "config"\ninput_rate = 1\noutput_rate = 2\nbase_fee = 0.001\n'
              '# gpt-4o is dearer here\n[providers.models."gpt-4o"]\ninput_rate = 2.5\noutput_rate = 10\n'
              'context_length = 128000\n[providers.models."llama3:8b"]\n')

    def test_tables_set_their_own_figures_and_inherit_the_rest(self):
        provider = make_config(self.TABLES).providers[0]
        assert list(provider.models) == ["gpt-4o", "llama3:8b"]
        assert provider.configured_rates("gpt-4o") == Rates(Decimal("2.5"), Decimal(10), Decimal("0.001"))
        assert provider.configured_rates("llama3:8b") == Rates(Decimal(1), Decimal(2), Decimal("0.001"))
        assert provider.models["gpt-4o"].context_length == 128000

    def test_a_list_of_models_still_means_one_rate_for_all(self):
        provider = make_config(ALPHA).providers[0]
        assert provider.pricing == "live" and list(provider.models) == ["gpt-4o"]
        assert provider.configured_rates("gpt-4o") == Rates(Decimal("3.03"), Decimal(6), Decimal(0))

    def test_live_pricing_needs_neither_models_nor_rates(self):
        text = '[[providers]]\nname = "a"\nurl = "https://a.example"\napi_key = "sk-a-0123456789abcdef"\n'
        config = make_config(text)
        assert config.providers[0].models == {} and config.providers[0].priced_models == []
        assert any("not routed to while that cannot be read" in w for w in config.warnings())

    def test_config_pricing_needs_a_price_for_every_model(self):
        text = self.TABLES.replace("input_rate = 1\noutput_rate = 2\n", "")
        found = problems(text)
        assert found == ['providers[a]: pricing = "config" but llama3:8b has no input_rate and output_rate: '
                         'set them on the provider or in [providers.models."NAME"]']

    def test_a_bad_figure_is_named_by_model(self):
        found = problems(self.TABLES.replace("output_rate = 10", "output_rate = -1"))
        assert found == ["providers[a].models.gpt-4o.output_rate: Input should be greater than or equal to 0"]

    def test_unknown_pricing_mode(self):
        found = problems(ALPHA + 'pricing = "guess"\n')
        assert len(found) == 1 and found[0].startswith("providers[alpha].pricing:")

    def test_refresh_settings(self):
        routing = make_config(ALPHA, extra="[routing]\nprice_refresh = 60\nmax_price_jump = 3\n").routing
        assert (routing.price_refresh, routing.max_price_jump) == (60, 3)
        assert make_config(ALPHA).routing.price_refresh == 300
        assert problems(ALPHA + "[routing]\nmax_price_jump = 1\n")[0].startswith("routing.max_price_jump")


class TestDiscovery:
    def test_defaults_and_settings(self):
        assert make_config(ALPHA).discovery.directory == "https://api.routstr.com/v1/providers/"
        discovery = make_config(ALPHA, extra='[discovery]\nrelays = ["ws://127.0.0.1:7000"]\ndirectory = ""\n').discovery
        assert (discovery.relays, discovery.directory) == (["ws://127.0.0.1:7000"], None)

    def test_bad_urls_are_named(self):
        found = problems(ALPHA + '[discovery]\nrelays = ["https://relay.example"]\ndirectory = "ftp://x"\n')
        assert found == ["discovery.relays: 'https://relay.example' is not a ws:// or wss:// relay URL",
                         "discovery.directory: 'ftp://x' is not an http(s) URL"]
