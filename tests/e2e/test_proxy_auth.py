"""Regular mode with an auth token: nothing is routed for a client without it as proxy credentials,
neither chat paid with the user's sats nor a relay to another loopback service."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from conftest import chat_requests, provider_toml
from e2e.conftest import KINDS
from e2e.test_intercept import CLIENT_SCRIPT, client_env

TOKEN = "regular-mode-token-0123456789"
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def guarded(start_provider):
    provider = start_provider("routstr", ["gpt-4o"], 0.001, 0.002)
    config = provider_toml("routstr", provider.url, ["gpt-4o"], 1, 2) + \
        f'[server]\nauth_token = "{TOKEN}"\n[routing]\nhealth_interval = 0\n[database]\npath = ":memory:"\n'
    return provider, config


def with_credentials(url: str, user: str, password: str) -> str:
    return url.replace("http://", f"http://{user}:{password}@")


def assert_407(answer: httpx.Response) -> None:
    assert answer.status_code == 407, answer.text[:300]
    assert answer.json()["error"]["code"] == "proxy_auth_required"
    assert answer.headers["proxy-authenticate"].lower().startswith("basic")
    assert TOKEN not in answer.text


@pytest.mark.parametrize("kind", KINDS)
def test_strangers_get_407_for_chat_and_for_other_hosts(kind, guarded, start_provider, start_proxy):
    provider, config = guarded
    local_service = start_provider("loopback-service", ["x"], 0.001, 0.001)
    proxy = start_proxy(kind, config, mode="regular")
    for credentials in (None, ("arbstr", "wrong"), ("arbstr", TOKEN[:-1])):
        proxy_url = with_credentials(proxy.url, *credentials) if credentials else proxy.url
        with httpx.Client(proxy=proxy_url, timeout=10) as http:
            assert_407(http.post("http://api.openai.com/v1/chat/completions", json=BODY,
                                 headers={"authorization": "Bearer sk-stranger"}))
            assert_407(http.get(f"{local_service.url}/info"))
            with pytest.raises(httpx.ProxyError, match="407"):
                http.get("https://api.openai.com/v1/models")  # the CONNECT itself is refused
    assert not chat_requests(provider) and not local_service.requests


@pytest.mark.parametrize("kind", KINDS)
def test_the_token_as_proxy_password_routes_everything(kind, guarded, start_provider, start_proxy):
    provider, config = guarded
    local_service = start_provider("loopback-service", ["x"], 0.001, 0.001)
    proxy = start_proxy(kind, config, mode="regular")
    with httpx.Client(proxy=with_credentials(proxy.url, "any-user", TOKEN), timeout=10) as http:
        chat = http.post("http://api.openai.com/v1/chat/completions", json=BODY)
        assert chat.status_code == 200 and chat.headers["x-arbstr-provider"] == "routstr"
        assert http.get(f"{local_service.url}/info").json()["name"] == "loopback-service"
    # the credentials are checked and removed: neither the provider nor the other host sees them
    for request in [*provider.requests, *local_service.requests]:
        assert request.header("proxy-authorization") is None
        assert all(TOKEN not in value for _, value in request.headers)
    # the openai SDK, as README says: HTTPS_PROXY with the token (a CONNECT tunnel, then TLS)
    env = client_env(proxy)
    env["HTTPS_PROXY"] = env["HTTP_PROXY"] = with_credentials(proxy.url, "arbstr", TOKEN)
    run = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert '"provider": "routstr"' in run.stdout
    assert TOKEN not in proxy.log()
