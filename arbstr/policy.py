"""Which policy applies to a request: the `X-Arbstr-Policy` header, else a classifier, else the default."""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from arbstr.config import PoliciesConfig
from arbstr.errors import InvalidRequest, UnknownPolicy

DEFAULT_POLICY = "default"


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    strategy: str
    allowed_models: frozenset[str] | None = None
    max_sats_per_1k_output: Decimal | None = None
    max_sats_per_request: Decimal | None = None
    keywords: tuple[str, ...] = ()
    providers: frozenset[str] | None = None
    """Only these providers may serve the policy's requests (None: any)."""
    allow_fallback: bool = True
    max_price_ratio: Decimal | None = None

    def allows(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


@dataclass(frozen=True, slots=True)
class Pinning:
    """What a client asked of the candidates: only these providers, and whether another may step in."""

    providers: frozenset[str] | None = None
    allow_fallback: bool = True


NO_PINNING = Pinning()
FALLBACK_VALUES = {"none": False, "any": True}
"""What X-Arbstr-Fallback may say: `none` returns the pinned provider's failure as is."""


def parse_pinning(provider_header: str | None, fallback_header: str | None, known: Collection[str]) -> Pinning:
    """`X-Arbstr-Provider: a, b` and `X-Arbstr-Fallback: none|any`; InvalidRequest naming what is wrong."""
    if provider_header is None and fallback_header is None:
        return NO_PINNING
    providers = None
    if provider_header is not None:
        names = [n.strip() for n in provider_header.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if not names or unknown:
            raise InvalidRequest(
                f"X-Arbstr-Provider names no configured provider ({', '.join(unknown) or 'it is empty'}); "
                f"known providers: {', '.join(sorted(known))}.", code="unknown_provider",
                details={"param": "X-Arbstr-Provider"})
        providers = frozenset(names)
    allow_fallback = True
    if fallback_header is not None:
        value = fallback_header.strip().lower()
        if value not in FALLBACK_VALUES:
            raise InvalidRequest(f"X-Arbstr-Fallback must be one of {', '.join(FALLBACK_VALUES)}, not "
                                 f"'{fallback_header.strip()}'.", code="invalid_fallback",
                                 details={"param": "X-Arbstr-Fallback"})
        allow_fallback = FALLBACK_VALUES[value]
    return Pinning(providers, allow_fallback)


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
                providers=frozenset(rule.providers) if rule.providers else None,
                allow_fallback=rule.allow_fallback,
                max_price_ratio=rule.max_price_ratio,
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
