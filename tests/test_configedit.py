"""Adding and removing providers in a commented config.toml: every byte outside the edit stays."""

from __future__ import annotations

import os
from decimal import Decimal

import pytest

from arbstr.config import parse_config
from arbstr.configedit import ConfigEditError, add_provider, remove_provider, write_config

HEAD = '''# arbstr config: keep this comment
[server]
listen = "127.0.0.1:8080"   # loopback only

[routing]
price_refresh = 60
'''
ALPHA = '''
# alpha: the cheap one
# (two comment lines)
[[providers]]
name = "alpha"  # trailing comment
url = "https://alpha.example/v1"
api_key = "${ALPHA_KEY}"
models = [
    "gpt-4o",  # the one we use
    "llama3:8b",
]
# a note inside alpha, after its keys
input_rate = 3
output_rate = 12
'''
BETA = '''
# beta: per-model prices
[[providers]]
name = "beta"
url = "https://beta.example"
pricing = "config"
input_rate = 1
output_rate = 2
[providers.models."gpt-4o"]
input_rate = 2.5   # dearer
[providers.models."llama3:8b"]
'''
TAIL = '''
# policies follow; this comment belongs to them
[policies]
default_strategy = "cheapest"

[[policies.rules]]
name = "code"
keywords = ["code"]
'''
TEXT = HEAD + ALPHA + BETA + TAIL


class TestRemove:
    def test_a_middle_provider_goes_with_its_comment_and_model_tables(self):
        assert remove_provider(TEXT, "beta") == HEAD + ALPHA + TAIL

    def test_the_first_provider(self):
        assert remove_provider(TEXT, "alpha") == HEAD + BETA + TAIL

    def test_the_last_thing_in_the_file(self):
        text = HEAD + ALPHA + BETA
        assert remove_provider(text, "beta") == HEAD + ALPHA

    def test_unknown_name_lists_the_known_ones(self):
        with pytest.raises(ConfigEditError, match=r"no provider is named 'gamma' \(configured: alpha, beta\)"):
            remove_provider(TEXT, "gamma")

    def test_the_only_provider_cannot_go(self):
        with pytest.raises(ConfigEditError, match="would not be a valid config"):
            remove_provider(HEAD + ALPHA, "alpha")


class TestAdd:
    def test_goes_after_the_last_provider_before_what_follows(self):
        edited = add_provider(TEXT, "gamma", "https://gamma.example")
        block = '\n[[providers]]\nname = "gamma"\nurl = "https://gamma.example/v1"\n'
        assert edited == HEAD + ALPHA + BETA + block + TAIL
        assert [p.name for p in parse_config(edited, require_keys=False).providers] == ["alpha", "beta", "gamma"]

    def test_with_key_models_and_rates(self):
        edited = add_provider(HEAD + ALPHA, "gamma", "http://127.0.0.1:9000/v1", api_key="${GAMMA_KEY}",
                              models=["x"], pricing="config", input_rate=Decimal("0.5"), output_rate=Decimal("2"))
        assert edited == HEAD + ALPHA + ('\n[[providers]]\nname = "gamma"\nurl = "http://127.0.0.1:9000/v1"\n'
                                         'api_key = "${GAMMA_KEY}"\npricing = "config"\nmodels = ["x"]\n'
                                         'input_rate = 0.5\noutput_rate = 2\n')

    def test_into_a_config_without_providers(self):
        assert add_provider(HEAD, "gamma", "https://g.example") == (
            HEAD + '\n[[providers]]\nname = "gamma"\nurl = "https://g.example/v1"\n')

    def test_a_file_without_a_final_newline(self):
        assert add_provider(HEAD.rstrip("\n"), "g", "https://g.example").startswith(HEAD + "\n[[providers]]")

    def test_then_remove_gives_back_the_original(self):
        assert remove_provider(add_provider(TEXT, "gamma", "https://gamma.example"), "gamma") == TEXT

    @pytest.mark.parametrize("name, url, message", [
        ("alpha", "https://x.example", "already configured"),
        ("bad name!", "https://x.example", "would not be a valid config"),
        ("ok", "ftp://x", "is not an http"),
    ])
    def test_refused(self, name, url, message):
        with pytest.raises(ConfigEditError, match=message):
            add_provider(TEXT, name, url)

    def test_not_toml(self):
        with pytest.raises(ConfigEditError, match="not valid TOML"):
            add_provider("[server\n", "g", "https://g.example")


def test_write_config_keeps_the_files_mode(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(TEXT)
    os.chmod(path, 0o600)
    write_config(path, "x = 1\n")
    assert path.read_text() == "x = 1\n" and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]
