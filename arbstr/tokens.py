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


def prompt_token_bound(body_bytes: int, messages: list[dict[str, Any]]) -> int | None:
    """At most this many prompt tokens, or None when no bound is known. Every token of a byte-level
    tokenizer stands for at least one byte of text, and all the text a prompt holds (messages, tools,
    schemas) is in the request body, so its size plus each message's framing bounds the prompt. A
    message with media (an image, audio) has no such bound: a short URL can cost a thousand tokens."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and any(not isinstance(p, dict) or p.get("type", "text") != "text"
                                             for p in content):
            return None
    return body_bytes + TOKENS_PER_MESSAGE * len(messages) + 3


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(TOKENS_PER_MESSAGE + estimate_tokens(message_text(m.get("content"))) for m in messages) + 3
