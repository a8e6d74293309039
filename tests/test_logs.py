"""arbstr's own log: levels like RUST_LOG, a JSON line format, dependencies kept quiet, secrets redacted."""

from __future__ import annotations

import json
import logging

import pytest

from arbstr.logs import configure_logging, event, parse_log_spec
from arbstr.redact import remember


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class TestParseLogSpec:
    def test_a_level_alone_is_arbstr_s(self):
        assert parse_log_spec("debug") == (logging.DEBUG, {})
        assert parse_log_spec("WARNING") == (logging.WARNING, {})

    def test_logger_pairs_set_other_loggers(self):
        assert parse_log_spec("error,peewee=debug, mitmproxy.proxy=info") == (
            logging.ERROR, {"peewee": logging.DEBUG, "mitmproxy.proxy": logging.INFO})

    def test_the_default_is_info(self):
        assert parse_log_spec("") == (logging.INFO, {})

    @pytest.mark.parametrize("spec", ["loud", "debug,peewee=verbose", "5"])
    def test_an_unknown_level_is_named(self, spec):
        with pytest.raises(ValueError, match="is not a log level: use one of debug, info, warning, error"):
            parse_log_spec(spec)


def test_json_lines_carry_time_level_request_id_provider_and_event(capsys):
    configure_logging("debug", "json")
    event(logging.INFO, "request.settled", "settled %s", "r1", request_id="r1", provider="cheap", cost_sats="0.5")
    line = capsys.readouterr().err.strip()
    entry = json.loads(line)
    assert entry["level"] == "info" and entry["event"] == "request.settled"
    assert entry["request_id"] == "r1" and entry["provider"] == "cheap" and entry["cost_sats"] == "0.5"
    assert entry["message"] == "settled r1" and entry["time"].endswith("Z")


def test_text_lines_name_the_event_and_its_fields(capsys):
    configure_logging("info", "text")
    event(logging.WARNING, "request.failed", "it failed", request_id="r2", provider="dead")
    err = capsys.readouterr().err
    assert "WARNING arbstr: it failed [event=request.failed request_id=r2 provider=dead]" in err


def test_the_level_filters_arbstr_s_records(capsys):
    configure_logging("warning", "text")
    logging.getLogger("arbstr.engine").info("routine")
    logging.getLogger("arbstr").warning("worth seeing")
    err = capsys.readouterr().err
    assert "routine" not in err and "worth seeing" in err


def test_arbstr_s_records_stay_out_of_mitmproxy_s_root_handler(capsys):
    root_handler = Collect()
    logging.getLogger().addHandler(root_handler)
    try:
        configure_logging("debug", "text")
        logging.getLogger("arbstr").debug("only on arbstr's handler")
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert not root_handler.records
    assert "only on arbstr's handler" in capsys.readouterr().err


def test_peewee_sql_stays_out_unless_asked(capsys):
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)  # what mitmdump does
    try:
        configure_logging("debug", "text")
        logging.getLogger("peewee").debug("('SELECT 1', [])")
        assert "SELECT 1" not in capsys.readouterr().err
        configure_logging("debug,peewee=debug", "json")
        logging.getLogger("peewee").debug("('SELECT 2', [])")
        entry = json.loads(capsys.readouterr().err.strip())
        assert entry["logger"] == "peewee" and "SELECT 2" in entry["message"]
    finally:
        root.setLevel(level)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_registered_secrets_never_reach_a_line(capsys, log_format):
    secret = "cashuBsecret-token-for-the-redaction-test"
    remember([secret])
    configure_logging("debug", log_format)
    try:
        raise RuntimeError(f"provider said no to {secret}")
    except RuntimeError:
        logging.getLogger("arbstr").exception("failed with key %s", secret)
    event(logging.DEBUG, "x", "field too", provider="p", key=secret)
    err = capsys.readouterr().err
    assert secret not in err and err.count("REDACTED") >= 3


def test_bad_settings_are_value_errors():
    with pytest.raises(ValueError, match="not a log format: use text or json"):
        configure_logging("info", "xml")
