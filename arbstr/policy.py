"""Which policy applies to a request: the `X-Arbstr-Policy` header, else a classifier, else the default."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from arbstr.config import PoliciesConfig
from arbstr.errors import UnknownPolicy

DEFAULT_POLICY = "default"


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    strategy: str
    allowed_models: frozenset[str] | None = None
    max_sats_per_1k_output: Decimal | None = None
    max_sats_per_request: Decimal | None = None
    keywords: tuple[str, ...] = ()

    def allows(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


class Classifier(Protocol):
    """Picks a policy from the request's text; None leaves the choice to the default."""

    def classify(self, text: str) -> str | None: ...


class KeywordClassifier:
    """The first policy (in config order) with a keyword that appears as a whole word, ignoring case."""

    def __init__(self, policies: Sequence[Policy]) -> None:
        self._patterns = [
            (p.name, re.compile("|".join(rf"(?<!\w){re.escape(k.strip())}(?!\w)" for k in p.keywords), re.IGNORECASE))
            for p in policies if p.keywords
        ]

    def classify(self, text: str) -> str | None:
        for name, pattern in self._patterns:
            if pattern.search(text):
                return name
        return None


class PolicyBook:
    """The configured policies and the way one is chosen for a request."""

    def __init__(self, policies: Sequence[Policy], default: Policy, classifier: Classifier | None = None) -> None:
        self.default = default
        self.by_name = {p.name: p for p in policies}
        self.by_name.setdefault(default.name, default)
        self.classifier = classifier or KeywordClassifier(policies)

    @classmethod
    def from_config(cls, config: PoliciesConfig) -> PolicyBook:
        policies = [
            Policy(
                name=rule.name,
                strategy=rule.strategy or config.default_strategy,
                allowed_models=frozenset(rule.allowed_models) if rule.allowed_models else None,
                max_sats_per_1k_output=rule.max_sats_per_1k_output,
                max_sats_per_request=rule.max_sats_per_request,
                keywords=tuple(rule.keywords),
            )
            for rule in config.rules
        ]
        return cls(policies, Policy(DEFAULT_POLICY, config.default_strategy))

    def select(self, requested: str | None, text: str) -> Policy:
        """The policy named by the client, else the classifier's pick, else the default."""
        if requested is not None:
            requested = requested.strip()
            policy = self.by_name.get(requested)
            if policy is None:
                known = ", ".join(sorted(self.by_name))
                raise UnknownPolicy(f"Unknown policy '{requested}' in X-Arbstr-Policy; known policies: {known}.")
            return policy
        name = self.classifier.classify(text) if text else None
        return self.by_name[name] if name else self.default
