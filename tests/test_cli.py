"""The command line, run as a person would: exit codes and what it prints."""

from __future__ import annotations

import os

import pytest

from arbstr.cli import main

from conftest import provider_toml

GOOD = provider_toml("alpha", "https://alpha.example", ["gpt-4o"], 3, 12, api_key="${ALPHA_KEY}")


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHA_KEY", "sk-alpha-secret-key-0123456789")

    def write(text: str, mode: int = 0o600):
        path = tmp_path / "config.toml"
        path.write_text(text)
        os.chmod(path, mode)
        return str(path)
    return write


class TestCheck:
    def test_ok(self, config_file, capsys):
        assert main(["check", "-c", config_file(GOOD, 0o644)]) == 0  # readable, but it holds no secret
        out = capsys.readouterr().out
        assert out.strip() == "ok: 1 providers, 1 models, 0 policy rules"

    def test_every_problem_named_exit_1(self, config_file, capsys):
        text = GOOD.replace("output_rate = 12", "output_rat = 12") + provider_toml("beta", "nope", [], 1, 1)
        assert main(["check", "-c", config_file(text)]) == 1
        err = capsys.readouterr().err
        assert "4 problems" in err
        for where in ("providers[alpha].output_rat: unknown key", "providers[alpha].output_rate: is required",
                      "providers[beta].url", "providers[beta].models"):
            assert where in err

    def test_warns_about_literal_keys_and_readable_files(self, config_file, capsys):
        text = provider_toml("alpha", "https://alpha.example", ["gpt-4o"], 3, 12, api_key="sk-literal-key-000000000")
        assert main(["check", "-c", config_file(text, 0o644)]) == 0
        out = capsys.readouterr().out
        assert "holds secrets and other users can read it (mode 644)" in out and "chmod 600" in out
        assert "providers[alpha].api_key is written in the file" in out
        assert "sk-literal-key-000000000" not in out

    def test_warns_when_listening_beyond_loopback_without_a_token(self, config_file, capsys):
        assert main(["check", "-c", config_file(GOOD + '[server]\nlisten = "0.0.0.0:8080"\n')]) == 0
        assert "anyone who reaches it spends your sats" in capsys.readouterr().out
        assert main(["check", "-c", config_file(GOOD + '[server]\nlisten = "0.0.0.0:8080"\nauth_token = "t"\n')]) == 0
        assert "spends your sats" not in capsys.readouterr().out

    def test_missing_file(self, tmp_path, capsys):
        assert main(["check", "-c", str(tmp_path / "nope.toml")]) == 1
        assert "file not found" in capsys.readouterr().err


def test_providers_table_masks_keys(config_file, capsys):
    assert main(["providers", "-c", config_file(GOOD)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "URL", "MODELS", "IN/1K", "OUT/1K", "FEE", "KEY"]
    assert lines[1].split() == ["alpha", "https://alpha.example/v1", "gpt-4o", "3", "12", "0", "sk-…6789"]
    assert "sk-alpha-secret-key" not in out


def test_stats_on_an_unreachable_database_is_a_clear_error_without_the_password(capsys):
    assert main(["stats", "--db", "postgresql://arbstr:s3cret-pw@127.0.0.1:1/ledger"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("arbstr: cannot open the database postgresql://arbstr:***@127.0.0.1:1/ledger")
    assert "s3cret-pw" not in err


class TestServe:
    def test_listen_flag_names_the_instance_on_every_ledger_row(self, config_file, mocker):
        serve = mocker.patch("arbstr.server.serve", new=mocker.MagicMock(return_value=None))
        mocker.patch("arbstr.cli.asyncio.run")
        assert main(["serve", "-c", config_file(GOOD), "--listen", "127.0.0.1:9137"]) == 0
        config = serve.call_args.args[0]
        assert config.server.instance.endswith(":9137") and config.server.listen == "127.0.0.1:9137"
