"""Where the proxy listens: loopback unless told otherwise, and never open to the network without
`[server] auth_token`, whether it runs as `arbstr serve` or as a mitmdump script."""

from __future__ import annotations

import re
import subprocess

import openai
import pytest

from conftest import provider_toml
from e2e.conftest import BIN, CLIENT_KEY, ROOT, free_port

REFUSAL = re.compile(r"arbstr will not listen on (0\.0\.0\.0|every interface) without \[server\] auth_token")


def mitmproxy_tool(tool: str, config, tmp_path, *args: str) -> list[str]:
    """mitmdump or mitmweb with arbstr loaded as the README says, plus `args`."""
    web = ["--web-port", str(free_port()), "--set", "web_open_browser=false"] if tool == "mitmweb" else []
    return [str(BIN / tool), "-s", str(ROOT / "addons" / "arbstr.py"), "--mode", "reverse:http://127.0.0.1:1", *web,
            "--set", "connection_strategy=lazy", "--set", f"arbstr_config={config}",
            "--set", f"confdir={tmp_path / 'mitmproxy'}", *args]


def test_mitmdump_listens_where_the_config_says_and_keeps_sql_out_of_its_log(start_provider, start_process,
                                                                              tmp_path):
    provider = start_provider("only", ["gpt-4o"], 0.0025, 0.01)
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(provider_toml("only", provider.url, ["gpt-4o"], 2.5, 10)
                      + f'[server]\nlisten = "127.0.0.1:{port}"\n[database]\npath = "{tmp_path / "a.db"}"\n')
    # No --listen-host, no -p: mitmproxy alone would listen on every interface, port 8080.
    proxy = start_process(mitmproxy_tool("mitmdump", config, tmp_path, "--set", "termlog_verbosity=debug"),
                          name="mitmdump",
                          pattern=re.compile(rf"listening at (127\.0\.0\.1):({port})\b"))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20)
    answer = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "Hello from only"
    log = proxy.log()
    assert "POST http" in log and "<< 200 OK" in log  # the flow itself is logged
    # mitmproxy shows debug records, but the ledger's SQL is not among them (ARBSTR_LOG=debug would).
    assert not re.search(r"\b(SELECT|INSERT INTO|CREATE TABLE)\b", log)


@pytest.mark.parametrize("kind", ["serve", "mitmdump", "mitmweb"])
def test_a_listener_open_to_the_network_without_a_token_is_refused(kind, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(provider_toml("only", "http://127.0.0.1:9", ["gpt-4o"], 2.5, 10)
                      + '[database]\npath = ":memory:"\n')
    if kind == "serve":
        command = [str(BIN / "arbstr"), "serve", "-c", str(config), "--listen", "0.0.0.0:0",
                   "--confdir", str(tmp_path / "mitmproxy")]
    else:
        command = mitmproxy_tool(kind, config, tmp_path, "--listen-host", "0.0.0.0", "-p", "0")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert REFUSAL.search(output), output
