"""The endpoints arbstr answers itself, built from the engine's state and never forwarded.

Each returns `(status, payload)`; the addon turns that into a response. No secret is ever in a payload.
"""

from __future__ import annotations

from typing import Any

from arbstr import __version__
from arbstr.config import mask_secret
from arbstr.engine import Engine
from arbstr.pricing import Rates

Answer = tuple[int, dict[str, Any]]


def _rates(rates: Rates) -> dict[str, float]:
    return {"input_rate": float(rates.input_per_1k), "output_rate": float(rates.output_per_1k),
            "base_fee": float(rates.per_request)}


def list_models(engine: Engine) -> Answer:
    """OpenAI's model list, each model with the providers (cheapest output first) and prices that serve it."""
    data = []
    for model in engine.catalogue.models():
        offers = sorted(engine.catalogue.by_model[model], key=lambda o: (o.rates.output_per_1k, o.rank))
        data.append({
            "id": model, "object": "model", "created": 0, "owned_by": "arbstr",
            "providers": [{"name": o.provider, **_rates(o.rates)} for o in offers],
        })
    return 200, {"object": "list", "data": data}


def health(engine: Engine) -> Answer:
    return 200, {
        "status": "ok", "version": __version__,
        "providers": [{"name": p.name, "models": len(p.models)} for p in engine.config.providers],
    }


def list_providers(engine: Engine) -> Answer:
    return 200, {"providers": [
        {"name": p.name, "url": p.url, "models": list(p.models),
         "input_rate": float(p.input_rate), "output_rate": float(p.output_rate), "base_fee": float(p.base_fee),
         "api_key": mask_secret(p.api_key)}
        for p in engine.config.providers
    ]}


ENDPOINTS = {
    "/v1/models": list_models,
    "/models": list_models,
    "/health": health,
    "/providers": list_providers,
}
"""GET endpoints by path."""
