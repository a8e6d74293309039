import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arbstr import chat
from arbstr.chat import parse_chat_request
from arbstr.errors import InvalidRequest
from arbstr.tokens import estimate_prompt_tokens, estimate_tokens


def body(**fields) -> bytes:
    return json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


class TestParse:
    def test_reads_the_facts(self):
        chat = parse_chat_request(body(stream=True, max_tokens=50, max_completion_tokens=20))
        assert (chat.model, chat.stream, chat.max_output_tokens) == ("gpt-4o", True, 20)
        assert chat.input_tokens == estimate_prompt_tokens([{"role": "user", "content": "hi"}])

    def test_last_user_text_skips_assistant_and_reads_parts(self):
        chat = parse_chat_request(json.dumps({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "write"}, {"type": "text", "text": "python"}]},
            {"role": "assistant", "content": "sure"},
        ]}).encode())
        assert chat.last_user_text == "write python"

    @pytest.mark.parametrize("raw,code", [
        (b"not json", "invalid_json"),
        (b"\xff\xfe{}", "invalid_body"),
        (b"[1, 2]", "invalid_body"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "missing_model"),
        (b'{"model": "", "messages": [{"role": "user", "content": "x"}]}', "missing_model"),
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "missing_model"),
        (b'{"model": "m"}', "missing_messages"),
        (b'{"model": "m", "messages": []}', "missing_messages"),
        (b'{"model": "m", "messages": ["hi"]}', "invalid_messages"),
        (b'{"model": "m", "messages": [{}], "stream": "yes"}', "invalid_stream"),
        (b'{"model": "m", "messages": [{}], "max_tokens": -1}', "invalid_max_tokens"),
        (b'{"model": "m", "messages": [{}], "max_tokens": true}', "invalid_max_tokens"),
    ])
    def test_bad_bodies_are_400_with_a_code(self, raw, code):
        with pytest.raises(InvalidRequest) as err:
            parse_chat_request(raw)
        assert err.value.status == 400 and err.value.code == code
        assert set(err.value.to_payload()["error"]) >= {"message", "type", "code"}


class TestTokens:
    def test_four_chars_a_token_rounded_up(self):
        assert [estimate_tokens(t) for t in ("", "a", "abcd", "abcde")] == [0, 1, 1, 2]

    def test_a_text_prompt_is_bounded_by_the_body_a_prompt_with_media_is_not(self):
        text = json.dumps({"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
        chat = parse_chat_request(text.encode())
        assert chat.prompt_token_bound == len(text.encode()) + 2 * 4 + 3
        assert chat.prompt_token_bound >= chat.input_tokens
        image = {"type": "image_url", "image_url": {"url": "https://x.example/cat.png"}}
        media = json.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "?"}, image]}]})
        assert parse_chat_request(media.encode()).prompt_token_bound is None

    def test_prompt_adds_message_framing(self):
        assert estimate_prompt_tokens([{"role": "user", "content": "abcd"}] * 2) == 2 * (4 + 1) + 3


class TestSignals:
    @pytest.mark.parametrize("fields,expected", [
        ({}, set()),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, {"tools"}),
        ({"tools": []}, set()),
        ({"functions": [{"name": "f"}]}, {"tools"}),
        ({"response_format": {"type": "json_object"}}, {"json"}),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, {"json"}),
        ({"response_format": {"type": "text"}}, set()),
        ({"response_format": "json"}, set()),
        ({"stream": True, "stream_options": {"include_usage": True}}, {"usage"}),
        ({"messages": [{"role": "user", "content": "x"}] * 8}, {"long"}),
        ({"messages": [{"role": "user", "content": "x"}] * 7}, set()),
    ])
    def test_what_the_request_says_about_its_reply(self, fields, expected):
        assert parse_chat_request(body(**fields)).signals == expected


_NUMBERS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62, max_value=2**70)
            | st.integers(min_value=-2**70, max_value=-2**62) | st.floats() | st.text(max_size=3))
_CONTENT = st.text(max_size=12) | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}),
                                           max_size=2) | _NUMBERS


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-4o", "", 7]),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                                 "content": _CONTENT}), max_size=3)},
    optional={"max_tokens": _NUMBERS, "max_completion_tokens": _NUMBERS, "stream": _NUMBERS,
              "tools": st.lists(st.just({"type": "function"}), max_size=1), "seed": _NUMBERS}),
    st.booleans())
def test_a_request_reads_the_same_as_with_json_loads(fields, ascii_only):
    # orjson reads an integer past 64 bits as a float: the request still reads as json.loads reads it.
    raw = json.dumps(fields, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")

    def outcome() -> object:
        try:
            return parse_chat_request(raw)
        except InvalidRequest as exc:
            return exc.code, exc.message

    ours = outcome()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chat, "read_json", json.loads)
        assert outcome() == ours
