"""Token estimates for when no tokenizer answer is at hand: before a request is sent, or when a
provider reports no usage. About four characters a token, as OpenAI's own rule of thumb."""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
"""Role and framing tokens that chat templates add around each message."""


def estimate_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def message_text(content: Any) -> str:
    """The text of a message's `content`: a string, or the `text` parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(TOKENS_PER_MESSAGE + estimate_tokens(message_text(m.get("content"))) for m in messages) + 3
