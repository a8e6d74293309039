"""The command line, run as a person would: exit codes and what it prints."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from arbstr.cli import main
from arbstr.config import load_config
from arbstr.errors import ConfigError
from arbstr.store import Ledger
from arbstr.mock import MockModel

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
        text = (GOOD.replace("output_rate = 12", "output_rat = 12") + provider_toml("beta", "nope", [], 1, 1)
                + 'pricing = "config"\n')
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
    assert lines[0].split() == ["NAME", "URL", "PRICING", "MODEL", "IN/1K", "OUT/1K", "FEE", "KEY"]
    assert lines[1].split() == ["alpha", "https://alpha.example/v1", "live", "gpt-4o", "3", "12", "0", "sk-…6789"]
    assert "sk-alpha-secret-key" not in out


def test_stats_on_an_unreachable_database_is_a_clear_error_without_the_password(capsys):
    assert main(["stats", "--db", "postgresql://arbstr:s3cret-pw@127.0.0.1:1/ledger"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("arbstr: cannot open the database postgresql://arbstr:***@127.0.0.1:1/ledger")
    assert "s3cret-pw" not in err


@pytest.mark.parametrize("command", ["stats", "logs"])
def test_reading_a_database_that_is_not_there_says_so_and_creates_nothing(command, tmp_path, capsys):
    missing = tmp_path / "typo.db"
    assert main([command, "--db", str(missing)]) == 1
    assert capsys.readouterr().err.startswith(f"arbstr: no database at {missing}: arbstr serve creates it")
    assert not missing.exists()


class TestServe:
    def test_listen_flag_names_the_instance_on_every_ledger_row(self, config_file, mocker):
        serve = mocker.patch("arbstr.server.serve", new=mocker.MagicMock(return_value=None))
        mocker.patch("arbstr.cli.asyncio.run")
        assert main(["serve", "-c", config_file(GOOD), "--listen", "127.0.0.1:9137"]) == 0
        config = serve.call_args.args[0]
        assert config.server.instance.endswith(":9137") and config.server.listen == "127.0.0.1:9137"


class TestLivePrices:
    def test_providers_live_shows_advertised_prices_next_to_the_config(self, config_file, capsys, start_provider):
        node = start_provider("node", ["gpt-4o", "llama3:8b"], 0.002, 0.008, 0.001)
        node.set_model(MockModel("llama3:8b", 0.002, 0.008, 0.001, enabled=False))
        text = provider_toml("alpha", node.url, ["gpt-4o", "gone"], 3, 12, api_key="${ALPHA_KEY}")
        assert main(["providers", "--live", "-c", config_file(text)]) == 0
        rows = {line.split()[3]: line.split()[4:] for line in capsys.readouterr().out.splitlines()[1:]}
        assert rows["gpt-4o"] == ["3", "12", "0", "sk-…6789", "2", "8", "0.001", "live"]
        assert rows["gone"] == ["3", "12", "0", "sk-…6789", "-", "-", "-", "no:", "not", "listed"]
        assert rows["llama3:8b"] == ["-", "-", "-", "sk-…6789", "2", "8", "0.001", "no:", "disabled"]

    def test_check_live_says_why_a_provider_cannot_be_routed_to(self, config_file, capsys, start_provider):
        node = start_provider("node", ["gpt-4o"], 0.002, 0.008)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        text = (GOOD.replace("https://alpha.example", node.url)
                + f'[[providers]]\nname = "nowhere"\nurl = "http://127.0.0.1:{port}"\napi_key = "${{ALPHA_KEY}}"\n')
        assert main(["check", "--live", "-c", config_file(text)]) == 0
        out = capsys.readouterr().out
        assert "providers[nowhere]: prices only from its /v1/models" in out  # said without reading, too
        assert "providers[nowhere]: not routed to: its /v1/models cannot be read (" in out
        assert "and no rates are configured to fall back on" in out
        assert "providers[alpha]: not routed" not in out
        assert out.splitlines()[-1] == "ok: 2 providers, 1 models, 0 policy rules; 1 provider cannot be routed to"


class TestLedgerCommandsNeedOnlyTheDatabase:
    def test_stats_and_logs_run_without_provider_keys(self, tmp_path, capsys, monkeypatch):
        monkeypatch.delenv("DATABASE_URL", raising=False)
        db = tmp_path / "ledger.db"
        Ledger(str(db)).close()
        path = tmp_path / "config.toml"
        path.write_text('[[providers]]\nname = "alpha"\nurl = "https://alpha.example"\napi_key = "${UNSET_KEY}"\n'
                        f'[database]\npath = "{db}"\n')
        with pytest.raises(ConfigError):
            load_config(path)  # serving would need the key
        assert main(["stats", "-c", str(path)]) == 0
        assert main(["logs", "-c", str(path)]) == 0
        out = capsys.readouterr().out
        assert "total" in out and "0 of 0 requests" in out

    def test_a_bad_database_table_is_named(self, tmp_path, capsys):
        path = tmp_path / "config.toml"
        path.write_text('[database]\nflush_interval = "soon"\n')
        assert main(["stats", "-c", str(path)]) == 1
        assert "database.flush_interval" in capsys.readouterr().err


class TestProvidersAddRemove:
    def test_add_then_remove_leaves_the_file_as_it_was(self, config_file, capsys):
        original = "# my providers\n" + GOOD + "\n# the policies\n[policies]\ndefault_strategy = \"cheapest\"\n"
        path = config_file(original)
        assert main(["providers", "-c", path, "add", "beta", "http://127.0.0.1:9/v1", "--api-key", "${BETA_KEY}",
                     "--model", "gpt-4o", "--input-rate", "1.5", "--output-rate", "6"]) == 0
        edited = Path(path).read_text()
        assert edited == original.replace("\n# the policies", '\n[[providers]]\nname = "beta"\n'
                                          'url = "http://127.0.0.1:9/v1"\napi_key = "${BETA_KEY}"\nmodels = ["gpt-4o"]\n'
                                          'input_rate = 1.5\noutput_rate = 6\n\n# the policies')
        assert capsys.readouterr().out == f"{path}: added provider beta\n"
        assert main(["providers", "remove", "beta", "-c", path]) == 0
        assert Path(path).read_text() == original

    def test_a_literal_key_is_warned_about(self, config_file, capsys):
        path = config_file(GOOD)
        assert main(["providers", "add", "-c", path, "beta", "https://b.example", "--api-key", "sk-literal-0123456789"]) == 0
        assert "providers[beta].api_key is written in the file" in capsys.readouterr().out

    def test_errors_are_sentences_and_leave_the_file(self, config_file, capsys):
        path = config_file(GOOD)
        assert main(["providers", "-c", path, "remove", "nobody"]) == 1
        assert main(["providers", "-c", path, "add", "alpha", "https://b.example"]) == 1
        err = capsys.readouterr().err
        assert "arbstr: no provider is named 'nobody' (configured: alpha)" in err
        assert "arbstr: a provider named 'alpha' is already configured" in err
        assert Path(path).read_text() == GOOD
