"""Regular proxy mode: tools written for api.openai.com reach a Routstr provider through
HTTPS_PROXY without a line changed; every other host passes through untouched."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from mitmproxy import certs

from conftest import chat_requests, provider_toml
from e2e.conftest import BIN, KINDS, free_port, get_server

USER_OPENAI_KEY = "sk-user-own-openai-key-0000000000"
PROVIDER_KEY = "sk-routstr-provider-key-000000000"

CLIENT_SCRIPT = """
import json, openai
client = openai.OpenAI(api_key="%s", max_retries=0, timeout=20)  # base_url left at api.openai.com
raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
out = {"provider": raw.headers.get("x-arbstr-provider"), "content": raw.parse().choices[0].message.content}
stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
out["streamed"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
out["models"] = sorted(m.id for m in client.models.list().data)
print(json.dumps(out))
""" % USER_OPENAI_KEY


@pytest.fixture
def routstr(start_provider):
    provider = start_provider("routstr", ["gpt-4o"], 0.001, 0.002)
    config = provider_toml("routstr", provider.url, ["gpt-4o"], 1, 2, api_key=PROVIDER_KEY) + \
        '[routing]\nhealth_interval = 0\n[database]\npath = ":memory:"\n'
    return provider, config


def client_env(proxy) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "openai_base_url", "openai_api_key")}
    return env | {"HTTPS_PROXY": proxy.url, "HTTP_PROXY": proxy.url, "SSL_CERT_FILE": str(proxy.ca_file)}


@pytest.mark.parametrize("kind", KINDS)
def test_the_openai_sdk_through_https_proxy_reaches_routstr(kind, routstr, start_proxy):
    provider, config = routstr
    proxy = start_proxy(kind, config, mode="regular")
    assert proxy.ca_file.exists()
    run = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT], env=client_env(proxy), capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out == {"provider": "routstr", "content": "Hello from routstr", "streamed": "Hello from routstr ",
                   "models": ["gpt-4o"]}
    sent = chat_requests(provider)
    assert len(sent) == 2
    for request in provider.requests:
        assert request.header("authorization") == f"Bearer {PROVIDER_KEY}"
        assert all(USER_OPENAI_KEY not in value for _, value in request.headers)


def test_plain_http_to_another_host_passes_through_unchanged(routstr, start_provider, start_proxy):
    provider, config = routstr
    elsewhere = start_provider("elsewhere", ["other"], 0.001, 0.001)
    proxy = start_proxy("serve", config, mode="regular")
    with httpx.Client(proxy=proxy.url, timeout=10) as http:
        answer = http.get(f"{elsewhere.url}/info", headers={"authorization": f"Bearer {USER_OPENAI_KEY}",
                                                           "x-custom": "kept"})
        chat = http.post(f"{elsewhere.url}/chat/completions", headers={"authorization": "Bearer sk-elsewhere-key"},
                         json={"model": "other", "messages": [{"role": "user", "content": "x"}]})
    assert answer.status_code == 200 and answer.json()["name"] == "elsewhere"
    assert "x-arbstr-provider" not in answer.headers
    received = elsewhere.requests[0]
    assert received.header("authorization") == f"Bearer {USER_OPENAI_KEY}" and received.header("x-custom") == "kept"
    # a chat request to a host that is not intercepted is not routed either
    assert chat.headers.get("x-arbstr-provider") is None and chat.json()["model"] == "other"
    assert not chat_requests(provider)


@pytest.fixture
def https_elsewhere(tmp_path):
    """An HTTPS server with a certificate from a CA of its own, which only the client trusts."""
    store = certs.CertStore.from_store(tmp_path / "other-ca", "other", 2048)
    entry = store.get_cert("localhost", ["localhost"], None)
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(entry.cert.to_pem())
    key_file.write_bytes(entry.privatekey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    with get_server(lambda: b"untouched", tls=context) as server:
        yield server.server_address[1], tmp_path / "other-ca" / "other-ca-cert.pem"


def test_tls_to_another_host_is_not_decrypted(routstr, https_elsewhere, start_proxy):
    provider, config = routstr
    port, other_ca = https_elsewhere
    proxy = start_proxy("serve", config, mode="regular")
    # Only the server's own CA is trusted: had arbstr decrypted the connection, its certificate
    # (signed by arbstr's CA) would fail verification.
    with httpx.Client(proxy=proxy.url, verify=ssl.create_default_context(cafile=str(other_ca)), timeout=10) as http:
        answer = http.get(f"https://localhost:{port}/")
    assert answer.status_code == 200 and answer.text == "untouched"


def test_reverse_and_regular_mode_at_once(routstr, start_process, tmp_path):
    provider, config = routstr
    ports = [free_port(), free_port()]
    (tmp_path / "both.toml").write_text(config)
    start_process([str(BIN / "arbstr"), "serve", "-c", str(tmp_path / "both.toml"), "--listen", "127.0.0.1:0",
                   "--confdir", str(tmp_path / "ca"), "--mode", f"reverse@{ports[0]}", "--mode", f"regular@{ports[1]}"],
                  name="both", count=2)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10) as http:
        reverse = http.post(f"http://127.0.0.1:{ports[0]}/v1/chat/completions", json=body)
    with httpx.Client(timeout=10, proxy=f"http://127.0.0.1:{ports[1]}",
                      verify=ssl.create_default_context(cafile=str(tmp_path / "ca" / "mitmproxy-ca-cert.pem"))) as http:
        regular = http.post("https://api.openai.com/v1/chat/completions", json=body,
                            headers={"authorization": f"Bearer {USER_OPENAI_KEY}"})
    assert reverse.headers["x-arbstr-provider"] == regular.headers["x-arbstr-provider"] == "routstr"
    assert len(chat_requests(provider)) == 2
