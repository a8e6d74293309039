"""The openai Node SDK in regular mode, as README tells Node users to run it: Node's fetch ignores
HTTPS_PROXY, so arbstr ships a preload that makes it use the proxy (`arbstr node-preload`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import chat_requests, provider_toml
from e2e.conftest import BIN

NODE_DIR = Path(__file__).parent / "node"
USER_KEY = "sk-node-user-openai-key-000000000"
TOKEN = "node-proxy-token-0123456789"


@pytest.fixture
def node_ready() -> None:
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        pytest.fail("the openai Node SDK is not installed: run `make test-deps` (npm install in tests/e2e/node)")


def node_env(proxy_url: str, ca_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("no_proxy", "https_proxy", "http_proxy", "openai_base_url", "openai_api_key")}
    return env | {"HTTPS_PROXY": proxy_url, "NODE_EXTRA_CA_CERTS": str(ca_file), "CLIENT_KEY": USER_KEY}


def run_node(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["node", *args, "client.mjs"], cwd=NODE_DIR, env=env, capture_output=True, text=True,
                          timeout=90)


def test_the_openai_node_sdk_through_regular_mode_with_the_preload(node_ready, start_provider, start_proxy):
    provider = start_provider("routstr", ["gpt-4o"], 0.001, 0.002)
    proxy = start_proxy("serve", provider_toml("routstr", provider.url, ["gpt-4o"], 1, 2)
                        + f'[server]\nauth_token = "{TOKEN}"\n'
                        + '[routing]\nhealth_interval = 0\n[database]\npath = ":memory:"\n', mode="regular")
    preload = subprocess.run([str(BIN / "arbstr"), "node-preload"], capture_output=True, text=True, timeout=30)
    assert preload.returncode == 0 and Path(preload.stdout.strip()).is_file()
    env = node_env(proxy.url.replace("http://", f"http://arbstr:{TOKEN}@"), proxy.ca_file)
    run = run_node(env, "--require", preload.stdout.strip())
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == {"provider": "routstr", "content": "Hello from routstr",
                                      "streamed": "Hello from routstr "}
    assert len(chat_requests(provider)) == 2
    assert all(USER_KEY not in value for r in provider.requests for _, value in r.headers)
    # without the preload, Node's fetch ignores HTTPS_PROXY: api.openai.com is not reachable from here
    plain = run_node(env)
    assert plain.returncode != 0 and len(chat_requests(provider)) == 2
