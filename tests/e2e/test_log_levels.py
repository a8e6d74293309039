"""arbstr's own log level and format in the real processes, apart from mitmproxy's flow output."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import provider_toml
from e2e.conftest import BIN

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("args, env, shown", [
    (("--log-level", "debug"), {}, True),
    ((), {"ARBSTR_LOG": "debug"}, True),
    ((), {}, False),  # info by default: a settled request is a debug line
    (("--log-level", "warning"), {"ARBSTR_LOG": "debug"}, False),  # the flag wins
])
def test_serve_logs_settled_requests_at_the_level_asked(start_provider, start_proxy, args, env, shown):
    provider = start_provider("only", ["gpt-4o"], 0.0025, 0.01)
    proxy = start_proxy("serve", provider_toml("only", provider.url, ["gpt-4o"], 2.5, 10),
                        env=os.environ | env, extra_args=args)
    raw = proxy.client().chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)
    request_id = raw.headers["x-arbstr-request-id"]
    proxy.stop()
    line = [x for x in proxy.log().splitlines() if request_id in x]
    assert bool(line) is shown
    if shown:
        assert "DEBUG arbstr: default gpt-4o via only: status 200" in line[0]
        assert "event=request.settled" in line[0] and "provider=only" in line[0]


def test_arbstr_s_level_leaves_mitmproxy_s_flow_output_alone(start_provider, start_proxy):
    provider = start_provider("only", ["gpt-4o"], 0.0025, 0.01)
    proxy = start_proxy("mitmdump", provider_toml("only", provider.url, ["gpt-4o"], 2.5, 10),
                        env=os.environ | {"ARBSTR_LOG": "error"})
    proxy.client().chat.completions.create(model="gpt-4o", messages=HI)
    proxy.stop()
    log = proxy.log()
    assert "POST http://" in log and "/v1/chat/completions" in log and "200 OK" in log
    assert " arbstr: " not in log  # no line of arbstr's own below error


@pytest.mark.parametrize("command", [["serve", "--log-level", "chatty"], ["serve"]])
def test_a_bad_log_setting_is_a_clear_error(tmp_path, command):
    config = tmp_path / "config.toml"
    config.write_text(provider_toml("only", "http://127.0.0.1:1", ["gpt-4o"], 1, 1))
    env = os.environ | {"ARBSTR_LOG_FORMAT": "xml" if command == ["serve"] else "text"}
    run = subprocess.run([str(BIN / "arbstr"), *command, "-c", str(config), "--listen", "127.0.0.1:0",
                          "--confdir", str(tmp_path / "mitm")], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert ("'chatty' is not a log level" if "chatty" in command else "'xml' is not a log format") in run.stderr
    assert "Traceback" not in run.stderr
