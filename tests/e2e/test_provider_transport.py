"""Providers behind HTTPS with a CA of their own, and behind a SOCKS5 proxy (as Tor .onion nodes
are): JSON answers and streams through the real proxy, to a mock node serving real TLS, through a
real SOCKS5 server (pproxy) the test starts on loopback."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from arbstr.mock import private_ca
from conftest import chat_requests, provider_toml
from e2e.conftest import BIN, free_port

TAIL = '[routing]\nhealth_interval = 0\n[database]\npath = ":memory:"\n'
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def tls_node(start_provider, tmp_path):
    """An HTTPS mock node whose certificate (localhost, 127.0.0.1) comes from its own CA."""
    ca_file, context = private_ca(tmp_path / "ca")
    return start_provider("secure", ["gpt-4o"], 0.001, 0.002, tls=context), ca_file


def chat_both_ways(proxy, times: int = 3) -> None:
    client = proxy.client()
    for _ in range(times):
        answer = client.chat.completions.create(model="gpt-4o", messages=HI)
        assert answer.choices[0].message.content == "Hello from secure"
    stream = client.chat.completions.create(model="gpt-4o", messages=HI, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello from secure "


def test_an_https_provider_with_its_own_ca(tls_node, start_proxy):
    node, ca_file = tls_node
    assert node.url.startswith("https://")
    proxy = start_proxy("serve", provider_toml("secure", node.url, ["gpt-4o"], 1, 2) + f'ca_file = "{ca_file}"\n'
                        + TAIL)
    chat_both_ways(proxy)
    assert len(chat_requests(node)) == 4
    assert node.tls_handshakes == 1  # one pooled connection: the handshake is not paid per request


def test_an_https_provider_from_an_untrusted_ca_is_a_connect_failure(tls_node, start_proxy):
    node, ca_file = tls_node
    proxy = start_proxy("serve", provider_toml("secure", node.url, ["gpt-4o"], 1, 2) + TAIL)
    with proxy.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HI})
    assert answer.status_code == 502
    assert "certificate verify failed" in answer.text
    assert not chat_requests(node)


def test_verify_false_connects_and_check_warns_loudly(tls_node, start_proxy, tmp_path):
    node, ca_file = tls_node
    proxy = start_proxy("serve", provider_toml("secure", node.url, ["gpt-4o"], 1, 2) + "verify = false\n" + TAIL)
    chat_both_ways(proxy, times=1)
    check = subprocess.run([str(BIN / "arbstr"), "check", "-c", str(tmp_path / "config.toml")],
                           capture_output=True, text=True, timeout=60)
    assert "providers[secure].verify = false: arbstr does NOT check" in check.stdout + check.stderr


def test_a_bad_proxy_or_ca_file_is_a_config_error(tls_node, start_proxy, tmp_path):
    node, ca_file = tls_node
    config = tmp_path / "bad.toml"
    config.write_text(provider_toml("secure", node.url, ["gpt-4o"], 1, 2)
                      + 'ca_file = "/no/such/ca.pem"\nproxy = "socks9://127.0.0.1:9050"\n'
                      + TAIL.replace("[routing]\n", '[routing]\nproxy = "socks5h://no-port"\n'))
    check = subprocess.run([str(BIN / "arbstr"), "check", "-c", str(config)], capture_output=True, text=True,
                           timeout=60)
    out = check.stdout + check.stderr
    assert check.returncode == 1
    assert "providers[secure].ca_file" in out and "providers[secure].proxy" in out and "routing.proxy" in out


@pytest.fixture
def socks5(start_process):
    """pproxy as a SOCKS5 server on loopback, logging each connection it makes (-v)."""
    port = free_port()
    # pproxy switches to uvloop whenever it is importable (another test dependency brings it), and
    # uvloop's loop policy then refuses pproxy's get_event_loop() on Python 3.12: keep it out.
    run = "import runpy, sys; sys.modules['uvloop'] = None; runpy.run_module('pproxy', run_name='__main__')"
    process = start_process([sys.executable, "-u", "-c", run, "-l", f"socks5://127.0.0.1:{port}", "-v"],
                            name="pproxy", pattern=re.compile(r"Serving on .* by socks5"))
    return f"socks5h://127.0.0.1:{port}", process


@pytest.mark.parametrize("where", ["provider", "routing"])
def test_a_provider_behind_socks5_with_the_name_resolved_by_the_proxy(where, tls_node, socks5, start_proxy):
    node, ca_file = tls_node
    proxy_url, pproxy = socks5
    # localhost, not 127.0.0.1: a name the proxy must resolve itself (socks5h, as a .onion needs)
    entry = provider_toml("secure", f"https://localhost:{node.port}/v1", ["gpt-4o"], 1, 2) + f'ca_file = "{ca_file}"\n'
    if where == "provider":
        config = entry + f'proxy = "{proxy_url}"\n' + TAIL
    else:
        config = entry + TAIL.replace("[routing]\n", f'[routing]\nproxy = "{proxy_url}"\n')
    proxy = start_proxy("serve", config)
    chat_both_ways(proxy)
    assert len(chat_requests(node)) == 4
    assert f"localhost:{node.port}" in pproxy.log(), pproxy.log()[-2000:]
