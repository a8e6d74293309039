"""How `arbstr serve` runs as a process: under `python -O`, unless PYTHONOPTIMIZE says otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import provider_toml


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


@pytest.mark.parametrize("env_value, optimized", [(None, True), ("0", False)])
def test_serve_runs_optimized_unless_pythonoptimize_is_set(env_value, optimized, start_provider, start_proxy):
    provider = start_provider("only", ["gpt-4o"], 0.0025, 0.01)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONOPTIMIZE"}
    if env_value is not None:
        env["PYTHONOPTIMIZE"] = env_value
    proxy = start_proxy("serve", provider_toml("only", provider.url, ["gpt-4o"], 2.5, 10), env=env)
    # The same process (exec keeps the pid), now an interpreter started with -O, or left as it was.
    assert ("-O" in cmdline(proxy.process.pid)) is optimized
    completion = proxy.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "Hello from only"
    # Routed and recorded as usual.
    assert proxy.http().get("/v1/stats").json()["totals"]["requests"] == 1
