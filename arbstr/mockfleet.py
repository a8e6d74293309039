"""The built-in mock providers behind `arbstr serve --mock`: real HTTP servers on loopback."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from arbstr.config import Config
from arbstr.mock import MockModel, MockProvider


@dataclass(frozen=True)
class MockSpec:
    """A mock provider; prices in Routstr's units (sats per token, sats per request)."""

    name: str
    models: tuple[str, ...]
    prompt: str
    completion: str
    request: str
    latency_factor: float

    def mock_models(self) -> list[MockModel]:
        return [MockModel(m, float(self.prompt), float(self.completion), float(self.request)) for m in self.models]


FLEET = (
    MockSpec("mock-premium", ("gpt-4o", "gpt-4o-mini"), "0.003", "0.012", "0.001", latency_factor=0.5),
    MockSpec("mock-budget", ("gpt-4o", "llama3:8b"), "0.0025", "0.01", "0.001", latency_factor=2.0),
    MockSpec("mock-mini", ("gpt-4o-mini", "llama3:8b"), "0.00015", "0.0006", "0", latency_factor=1.0),
)


class MockFleet:
    """Starts the mock providers and builds the config that routes to them."""

    def __init__(self, latency: float = 0.05) -> None:
        self.providers = [MockProvider(spec.name, spec.mock_models(), latency=latency * spec.latency_factor)
                          for spec in FLEET]

    def start(self) -> MockFleet:
        for provider in self.providers:
            provider.start()
        return self

    def stop(self) -> None:
        for provider in self.providers:
            provider.stop()

    def config(self, listen: str | None = None) -> Config:
        thousand = Decimal(1000)
        return Config.model_validate({
            "server": {"listen": listen} if listen else {},
            "database": {"path": ":memory:"},
            "providers": [
                # The mocks accept any sk- key; this one only shows where a real key goes.
                {"name": spec.name, "url": provider.url, "api_key": f"sk-mock-{spec.name}-key",
                 "models": list(spec.models),
                 "input_rate": Decimal(spec.prompt) * thousand,
                 "output_rate": Decimal(spec.completion) * thousand,
                 "base_fee": Decimal(spec.request)}
                for spec, provider in zip(FLEET, self.providers)
            ],
        })
