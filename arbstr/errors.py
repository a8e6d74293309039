"""The one error family: every failure a client can meet knows its HTTP status and OpenAI shape."""

from __future__ import annotations

import json
from typing import Any


class ArbstrError(Exception):
    """An error a client or user reads: an HTTP status, an OpenAI error type and a stable code."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 type: str | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.details = details or {}

    def to_payload(self) -> dict[str, Any]:
        """The OpenAI-shaped body: `{"error": {"message", "type", "code", ...details}}`."""
        return {"error": {"message": self.message, "type": self.type, "code": self.code, **self.details}}

    def to_json(self) -> bytes:
        return json.dumps(self.to_payload()).encode()


class ConfigError(ArbstrError):
    """The configuration cannot be used; `problems` names every key that is wrong."""

    code = "config_error"

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class InvalidRequest(ArbstrError):
    """The client's request is malformed (400)."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class NotFound(ArbstrError):
    """No such arbstr endpoint (404)."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Unauthorized(ArbstrError):
    """The client did not send arbstr's own auth token (401)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class TooLarge(ArbstrError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class MethodNotAllowed(ArbstrError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class UnknownPolicy(InvalidRequest):
    code = "unknown_policy"


class ModelNotFound(ArbstrError):
    """No configured provider offers the requested model (404, as OpenAI answers)."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ModelNotAllowed(InvalidRequest):
    """The chosen policy does not allow the requested model."""

    code = "model_not_allowed"


class NoEligibleProvider(InvalidRequest):
    """Providers offer the model, but the policy's constraints excluded every one of them."""

    code = "no_eligible_provider"


class UpstreamError(ArbstrError):
    """Every provider arbstr tried failed; `details["attempts"]` says how each failed."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"


class WalletError(ArbstrError):
    """The Cashu wallet cannot do what was asked: a mint refused or is unreachable, a token is bad."""

    status = 502
    type = "wallet_error"
    code = "wallet_error"


class InsufficientFunds(WalletError):
    """The wallet holds less than a payment needs; `details["shortfall_sats"]` says how much less."""

    status = 402
    type = "insufficient_quota"
    code = "insufficient_funds"
