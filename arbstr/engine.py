"""The routing state of a running arbstr: configuration, policies, offers and what has been learned.

One `Engine` per configuration; a reload builds a new one and swaps it in whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from arbstr.chat import ChatRequest, parse_chat_request
from arbstr.config import Config
from arbstr.policy import Policy, PolicyBook
from arbstr.router import Catalogue, RoutePlan, RouteRequest, plan_route
from arbstr.upstream import ProviderEndpoint


@dataclass(frozen=True, slots=True)
class Decision:
    """Everything decided about one request before it is sent."""

    request_id: str
    chat: ChatRequest
    policy: Policy
    plan: RoutePlan


class Engine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.policies = PolicyBook.from_config(config.policies)
        self.catalogue = Catalogue.from_providers(config.providers)
        self.endpoints = {
            p.name: ProviderEndpoint(p.name, p.url, p.api_key.get_secret_value() if p.api_key else "")
            for p in config.providers
        }
        self.learned_ratios: dict[str, float] = {}

    def output_ratio(self, policy: str) -> float:
        """Expected output tokens per input token for a policy: learned, else the configured default."""
        return self.learned_ratios.get(policy, self.config.routing.default_output_ratio)

    def decide(self, request_id: str, body: bytes, requested_policy: str | None) -> Decision:
        """Read a chat request and plan its route; ArbstrError when it cannot be served."""
        chat = parse_chat_request(body)
        policy = self.policies.select(requested_policy, chat.last_user_text)
        plan = plan_route(
            RouteRequest(chat.model, chat.input_tokens, chat.max_output_tokens),
            self.catalogue, policy, self.output_ratio(policy.name),
        )
        return Decision(request_id, chat, policy, plan)
