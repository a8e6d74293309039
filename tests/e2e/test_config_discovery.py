"""Where `mitmdump -s addons/arbstr.py` finds its config without --set: $ARBSTR_CONFIG, else ./config.toml."""

from __future__ import annotations

import os

import httpx
import pytest

from conftest import provider_toml
from e2e.conftest import BIN, ROOT


@pytest.mark.parametrize("where", ["cwd", "env"])
def test_mitmdump_finds_the_config_without_set(where, start_provider, start_process, tmp_path):
    cheap = start_provider("cheap", ["gpt-4o"], 0.001, 0.001)
    config = provider_toml("cheap", cheap.url, ["gpt-4o"], 1, 1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target = run_dir / "config.toml" if where == "cwd" else tmp_path / "elsewhere.toml"
    target.write_text(config + '[database]\npath = ":memory:"\n')
    env = dict(os.environ, ARBSTR_CONFIG=str(target)) if where == "env" else \
        {k: v for k, v in os.environ.items() if k != "ARBSTR_CONFIG"}
    mitmdump = start_process([str(BIN / "mitmdump"), "-s", str(ROOT / "addons" / "arbstr.py"), "--mode",
                              "reverse:http://127.0.0.1:1", "--set", "connection_strategy=lazy",
                              "--listen-host", "127.0.0.1", "-p", "0", "--set", f"confdir={tmp_path / 'ca'}"],
                             name="mitmdump", cwd=run_dir, env=env)
    with httpx.Client(timeout=10) as http:
        answer = http.post(f"http://127.0.0.1:{mitmdump.port}/v1/chat/completions",
                           json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.headers["x-arbstr-provider"] == "cheap"
