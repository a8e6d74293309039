"""Usage and cost read from Routstr responses: the real captures, every way a stream can be cut, hostile bytes."""

from __future__ import annotations

import json
import random
import tracemalloc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arbstr import usage as usage_module
from arbstr.usage import (EMPTY_REPORT, MAX_LINE_BYTES, MAX_TEXT_CHARS, StreamUsageObserver, UsageReport,
                          cost_msats_from_headers, read_json, usage_from_json)

SAMPLES = Path(__file__).resolve().parent / "samples"
# Read at import so a missing capture fails the whole file loudly instead of skipping anything.
CHAT_JSON = (SAMPLES / "chat.json").read_bytes()
CHAT_HEADERS = (SAMPLES / "chat.headers").read_bytes()
STREAM = (SAMPLES / "stream.sse").read_bytes()
STREAM_HEADERS = (SAMPLES / "stream.headers").read_bytes()

CHAT_REPORT = UsageReport(12, 5, 52, "Hello from fake upstream", complete=True, cache_read_tokens=0, cache_read_msats=0)
STREAM_REPORT = UsageReport(12, 5, 52, "Hello from fake upstream ", complete=True, cache_read_tokens=0, cache_read_msats=0)
BOM = b"\xef\xbb\xbf"

EVENTS = STREAM.split(b"\n\n")[:-1]
PAYLOADS = [event.removeprefix(b"data: ") for event in EVENTS]
FINISH_PAYLOAD = next(p for p in PAYLOADS if b'"finish_reason": "stop"' in p)
USAGE_PAYLOAD = next(p for p in PAYLOADS if b'"usage"' in p)
DELTA_PAYLOADS = PAYLOADS[:PAYLOADS.index(FINISH_PAYLOAD)]


def observe(chunks: Iterable[bytes]) -> UsageReport:
    observer = StreamUsageObserver()
    for chunk in chunks:
        observer.feed(chunk)
    return observer.finish()


def cut(stream: bytes, points: Iterable[int]) -> list[bytes]:
    """`stream` in pieces split at `points` (repeated points give empty pieces)."""
    bounds = [0, *sorted(points), len(stream)]
    return [stream[start:end] for start, end in zip(bounds, bounds[1:])]


def one_byte_chunks(stream: bytes) -> list[bytes]:
    return [stream[i:i + 1] for i in range(len(stream))]


def sse(*payloads: bytes) -> bytes:
    return b"".join(b"data: " + payload + b"\n\n" for payload in payloads)


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


def delta(text: str) -> bytes:
    return encode({"object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


def header_pairs(raw: bytes) -> list[tuple[str, str]]:
    """The header lines of a capture (status line dropped) as (name, value), repeats kept."""
    lines = raw.decode().split("\r\n")[1:]
    return [(name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines if line)]


def test_the_sample_stream_is_what_these_tests_assume():
    assert sse(*PAYLOADS) == STREAM
    assert PAYLOADS[-1] == b"[DONE]" and len(DELTA_PAYLOADS) == 4
    # The variants below rewrite line ends and break JSON after ", ": neither may occur inside a JSON string.
    assert b"\r" not in STREAM
    assert all(json.loads(p.replace(b", ", b",\n")) == json.loads(p) for p in PAYLOADS[:-1])


class TestRealCaptures:
    def test_chat_json(self):
        report = usage_from_json(CHAT_JSON)
        assert report == CHAT_REPORT
        assert report.has_usage

    def test_chat_headers(self):
        assert cost_msats_from_headers(header_pairs(CHAT_HEADERS)) == 52

    def test_stream_headers_carry_no_cost(self):
        assert cost_msats_from_headers(header_pairs(STREAM_HEADERS)) is None

    def test_stream(self):
        report = observe([STREAM])
        assert report == STREAM_REPORT
        assert report.has_usage

    def test_exact_cost_beats_the_rounded_down_sats(self):
        # The capture says cost_sats 0 for this 52 msat request: reading it would lose the whole cost.
        assert json.loads(USAGE_PAYLOAD)["usage"]["cost_sats"] == 0
        assert observe([STREAM]).cost_msats == 52


def _mixed_line_ends() -> bytes:
    # One style per event: a `\r` ending followed by a `\n` ending would read as a single `\r\n`.
    ends = [b"\n", b"\r\n", b"\r"]
    return b"".join(b"data: " + p + ends[i % 3] * 2 for i, p in enumerate(PAYLOADS))


def _with_other_fields(stream: bytes) -> bytes:
    return b": connected\n\n" + stream.replace(
        b"data: ", b": keep-alive\nevent: message\nid: 42\nretry: 1000\ndata: ")


VARIANTS = {
    "as captured": STREAM,
    "crlf": STREAM.replace(b"\n", b"\r\n"),
    "cr only": STREAM.replace(b"\n", b"\r"),
    "mixed line ends": _mixed_line_ends(),
    "data without space": STREAM.replace(b"data: ", b"data:"),
    "comments, event, id and retry lines": _with_other_fields(STREAM),
    "bom": BOM + STREAM,
    "json over several data lines": STREAM.replace(b", ", b",\ndata: "),
    "all at once": BOM + _with_other_fields(STREAM.replace(b", ", b",\ndata:")).replace(b"\n", b"\r\n"),
}


@pytest.mark.parametrize("stream", VARIANTS.values(), ids=VARIANTS.keys())
class TestEveryWayOfCuttingTheStream:
    def test_whole(self, stream):
        assert observe([stream]) == STREAM_REPORT

    def test_one_byte_at_a_time(self, stream):
        assert observe(one_byte_chunks(stream)) == STREAM_REPORT

    def test_every_single_cut(self, stream):
        for point in range(len(stream) + 1):
            assert observe(cut(stream, [point])) == STREAM_REPORT, f"cut at {point}"

    def test_random_chunkings(self, stream):
        rng = random.Random(len(stream))
        for _ in range(100):
            points = rng.choices(range(len(stream) + 1), k=rng.randint(1, 60))
            assert observe(cut(stream, points)) == STREAM_REPORT, sorted(points)


@settings(max_examples=100, deadline=None, database=None)
@given(st.sampled_from(sorted(VARIANTS)), st.data())
def test_any_chunking_of_any_variant(name, data):
    stream = VARIANTS[name]
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=80))
    assert observe(cut(stream, points)) == STREAM_REPORT


class TestNonAscii:
    STREAM = sse(delta("héllo "), delta("✓"), FINISH_PAYLOAD, USAGE_PAYLOAD, b"[DONE]")
    REPORT = UsageReport(12, 5, 52, "héllo ✓", complete=True, cache_read_tokens=0, cache_read_msats=0)

    def test_cut_everywhere_including_inside_characters(self):
        assert "✓".encode() in self.STREAM  # three bytes: cuts land inside it
        for point in range(len(self.STREAM) + 1):
            assert observe(cut(self.STREAM, [point])) == self.REPORT, f"cut at {point}"

    def test_one_byte_at_a_time(self):
        assert observe(one_byte_chunks(self.STREAM)) == self.REPORT

    def test_invalid_utf8_is_replaced_not_fatal(self):
        broken = b'{"choices": [{"delta": {"content": "a\xffb"}}]}'
        assert observe([sse(broken, USAGE_PAYLOAD)]) == UsageReport(12, 5, 52, "a\ufffdb", complete=False,
                                                                        cache_read_tokens=0, cache_read_msats=0)


class TestStreamContents:
    def test_no_usage_still_gathers_the_text(self):
        report = observe([sse(*DELTA_PAYLOADS, FINISH_PAYLOAD, b"[DONE]")])
        assert report == UsageReport(None, None, None, "Hello from fake upstream ", complete=True)
        assert not report.has_usage

    def test_openai_style_usage_without_cost(self):
        # OpenAI sends "usage": null on every chunk, then the counts in a last chunk with no choices.
        chunks = [encode({"choices": [{"delta": {"content": "hi"}, "finish_reason": None}], "usage": None}),
                  encode({"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": None}),
                  encode({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})]
        assert observe([sse(*chunks, b"[DONE]")]) == UsageReport(3, 1, None, "hi", complete=True)

    def test_the_last_usage_wins(self):
        first = encode({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                 "cost": {"total_msats": 7}}})
        report = observe([sse(first, USAGE_PAYLOAD, b"[DONE]")])
        assert (report.input_tokens, report.output_tokens, report.cost_msats) == (12, 5, 52)

    def test_a_later_null_usage_erases_nothing(self):
        late = encode({"choices": [], "usage": None})
        assert observe([sse(*PAYLOADS[:-1], late, b"[DONE]")]) == STREAM_REPORT

    def test_a_later_cost_only_chunk_sets_the_cost(self):
        late = encode({"choices": [], "cost": {"total_msats": 60}})
        report = observe([sse(*PAYLOADS[:-1], late, b"[DONE]")])
        assert (report.input_tokens, report.output_tokens, report.cost_msats) == (12, 5, 60)

    def test_usage_in_an_event_of_another_type(self):
        stream = b"event: usage\ndata: " + USAGE_PAYLOAD + b"\n\n"
        assert observe([stream]).cost_msats == 52

    def test_text_of_every_choice(self):
        chunk = encode({"choices": [{"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}}]})
        assert observe([sse(chunk)]).output_text == "ab"

    def test_output_text_is_capped(self):
        piece = "x" * 1000
        stream = sse(*[delta(piece)] * (MAX_TEXT_CHARS // 1000 + 5), USAGE_PAYLOAD)
        report = observe([stream])
        assert report.output_text == "x" * MAX_TEXT_CHARS
        assert report.cost_msats == 52

    def test_finish_returns_the_same_report_again(self):
        observer = StreamUsageObserver()
        observer.feed(STREAM[:100])
        first = observer.finish()
        assert observer.finish() is first
        assert not first.complete

    def test_empty_stream(self):
        assert observe([]) == EMPTY_REPORT
        assert observe([b"", b""]) == EMPTY_REPORT


class TestCompleteness:
    """Complete means `[DONE]` seen, or a finish_reason seen and the stream ended between events."""

    FINISH_END = STREAM.index(FINISH_PAYLOAD) + len(FINISH_PAYLOAD) + 2
    USAGE_JSON_END = STREAM.index(USAGE_PAYLOAD) + len(USAGE_PAYLOAD)

    def test_every_truncation(self):
        for end in range(len(STREAM) + 1):
            prefix = STREAM[:end]
            report = observe([prefix])
            finished_between_events = prefix.endswith(b"\n\n") and end >= self.FINISH_END
            assert report.complete == (b"data: [DONE]" in prefix or finished_between_events), end
            # A last event cut before its blank line is still read, so the usage counts once its JSON is whole.
            assert report.has_usage == (end >= self.USAGE_JSON_END), end
            assert STREAM_REPORT.output_text.startswith(report.output_text)

    def test_cut_before_the_finish_reason(self):
        report = observe([sse(*DELTA_PAYLOADS)])
        assert report == UsageReport(None, None, None, "Hello from fake upstream ", complete=False)

    def test_no_done_marker_but_finished_and_whole(self):
        assert observe([sse(*PAYLOADS[:-1])]) == STREAM_REPORT

    def test_no_done_marker_and_cut_inside_an_event(self):
        stream = sse(*PAYLOADS[:-1])
        assert not observe([stream[:-1]]).complete
        assert not observe([stream + b"data: {"]).complete


HOSTILE_PAYLOADS = [
    b"not json", b"{", b"[]", b"5", b'"text"', b"null", b"",
    b'{"usage": "lots"}',
    b'{"usage": {"prompt_tokens": -1, "completion_tokens": true}}',
    b'{"usage": {"prompt_tokens": "12", "completion_tokens": 5.0}}',
    b'{"usage": {"prompt_tokens": 1' + b"0" * 5000 + b"}}",  # more digits than Python will parse
    b'{"cost": {"total_msats": 99999999999999999999999}}',
    b'{"cost": {"total_msats": 1e400}, "usage": {"cost": 0.0001, "cost_sats": -3}}',
    b'{"cost": {"total_msats": NaN}, "metadata": {"routstr": "cost"}}',
    b'{"choices": "none"}',
    b'{"choices": [1, null, "x", {"delta": 5}, {"delta": {"content": 7}}, {"message": {"content": "m"}}]}',
    b"[" * 100_000,
    b'{"a":' * 50_000,
    b"\xff\xfe\x00\x00",
]


class TestHostileStreams:
    def test_hostile_events_before_the_real_ones_change_nothing(self):
        stream = sse(*HOSTILE_PAYLOADS, *PAYLOADS)
        assert observe([stream]) == STREAM_REPORT
        assert observe(cut(stream, range(0, len(stream), 997))) == STREAM_REPORT

    @settings(max_examples=150, deadline=None, database=None)
    @given(st.lists(st.sampled_from([b"data:", b"data: ", b":", b"event: x", b"\r", b"\n", b"\r\n", b"{",
                                     b'"usage": {', b'"prompt_tokens": 3,', b"[DONE]", BOM, b"\xe2\x9c", b"\xff"])
                    | st.binary(max_size=40), max_size=60),
           st.data())
    def test_garbage_never_raises_and_a_real_stream_after_it_reads_right(self, pieces, data):
        garbage = b"".join(pieces)
        stream = garbage + b"\n\n" + STREAM
        points = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
        assert observe(cut(garbage, [p for p in points if p <= len(garbage)])).cost_msats is None
        assert observe(cut(stream, points)) == STREAM_REPORT

    def test_partial_bom_then_end(self):
        assert observe([b"\xef", b"\xbb"]) == EMPTY_REPORT

    def test_overlong_line_is_dropped_and_parsing_resumes(self):
        stream = b"data: " + b"x" * MAX_LINE_BYTES + b"\r" + b"\n" + STREAM
        assert observe([stream]) == STREAM_REPORT
        assert observe(cut(stream, range(0, len(stream), 65_536))) == STREAM_REPORT

    @pytest.mark.parametrize("chunk_size", [None, 4093])
    def test_a_line_of_exactly_the_limit_is_read_one_byte_more_is_not(self, chunk_size):
        def usage_line(length: int) -> bytes:
            line = b"data: " + USAGE_PAYLOAD
            return line + b" " * (length - len(line)) + b"\n\n"

        def feed(stream: bytes) -> UsageReport:
            return observe([stream] if chunk_size is None else cut(stream, range(0, len(stream), chunk_size)))

        assert feed(usage_line(MAX_LINE_BYTES)).cost_msats == 52
        assert feed(usage_line(MAX_LINE_BYTES + 1)).cost_msats is None

    def test_an_event_with_too_much_data_is_dropped(self):
        # Blank data lines ahead of the usage still make valid JSON once joined: only the cap drops it.
        def event(blank_lines: int) -> bytes:
            blank_line = b"data: " + b" " * (MAX_LINE_BYTES // 8) + b"\n"
            return blank_line * blank_lines + b"data: " + USAGE_PAYLOAD + b"\n\n"

        assert observe([event(6)]).cost_msats == 52
        assert observe([event(8)]).cost_msats is None
        assert observe([event(8) + STREAM]) == STREAM_REPORT

    @pytest.mark.parametrize("piece", [b"x" * 65_536, (b"data: " + b"x" * 65_530 + b"\n")], ids=["line", "event"])
    def test_memory_stays_bounded_however_long_the_stream(self, piece):
        observer = StreamUsageObserver()
        tracemalloc.start()
        try:
            for _ in range(128):  # 8 MiB without a line end, or without an event end
                observer.feed(piece)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 2 * MAX_LINE_BYTES
        assert observer.finish() == EMPTY_REPORT

    def test_a_long_line_in_tiny_chunks(self):
        # Half a million 2-byte chunks of one long line. No timing is asserted (bench/ measures speed);
        # a feed() that rescanned its buffer would make this test run into pytest's timeout.
        line = b"data: " + USAGE_PAYLOAD
        stream = line + b" " * (MAX_LINE_BYTES - len(line)) + b"\n\n"
        observer = StreamUsageObserver()
        for chunk in cut(stream, range(0, len(stream), 2)):
            observer.feed(chunk)
        assert observer.finish().cost_msats == 52


COST_CASES = {
    "usage.cost first": ({"usage": {"prompt_tokens": 1, "completion_tokens": 1, "cost": {"total_msats": 1},
                                    "cost_sats": 4},
                          "cost": {"total_msats": 2}, "metadata": {"routstr": {"cost": {"total_msats": 3}}}}, 1),
    "then top-level cost": ({"usage": {"cost_sats": 4}, "cost": {"total_msats": 2},
                             "metadata": {"routstr": {"cost": {"total_msats": 3}}}}, 2),
    "then metadata.routstr": ({"usage": {"cost_sats": 4}, "metadata": {"routstr": {"cost": {"total_msats": 3}}}}, 3),
    "cost_sats only as a last resort": ({"usage": {"prompt_tokens": 1, "completion_tokens": 1, "cost_sats": 4}}, 4000),
    "zero msats is a cost, not a miss": ({"usage": {"cost": {"total_msats": 0}, "cost_sats": 4}}, 0),
    "wrong types are skipped": ({"usage": {"cost": 0.0001, "cost_sats": 2}, "cost": {"total_msats": "52"},
                                 "metadata": {"routstr": {"cost": {"total_msats": -1}}}}, 2000),
    "booleans are no amounts": ({"cost": {"total_msats": True}}, None),
    "no cost at all": ({"usage": {"prompt_tokens": 1, "completion_tokens": 1}}, None),
}


@pytest.mark.parametrize("body,msats", COST_CASES.values(), ids=COST_CASES.keys())
class TestCostPriority:
    def test_json(self, body, msats):
        assert usage_from_json(encode(body)).cost_msats == msats

    def test_stream(self, body, msats):
        assert observe([sse(encode(body))]).cost_msats == msats


class TestJson:
    def test_missing_usage(self):
        body = json.loads(CHAT_JSON)
        for key in ("usage", "cost", "metadata"):
            del body[key]
        report = usage_from_json(encode(body))
        assert report == UsageReport(None, None, None, "Hello from fake upstream", complete=True)
        assert not report.has_usage

    def test_text_of_every_choice(self):
        body = {"choices": [{"message": {"content": "a"}}, {"message": {"content": None}},
                            {"message": {"content": "b"}}]}
        assert usage_from_json(encode(body)).output_text == "ab"

    def test_text_is_capped(self):
        body = {"choices": [{"message": {"content": "y" * (MAX_TEXT_CHARS + 10)}}]}
        assert usage_from_json(encode(body)).output_text == "y" * MAX_TEXT_CHARS

    def test_leading_bom(self):
        assert usage_from_json(BOM + CHAT_JSON) == CHAT_REPORT

    @pytest.mark.parametrize("body", [b"[]", b"5", b'"x"', b"null", b"true", b"", b"   ",
                                      CHAT_JSON[:-1], CHAT_JSON.replace(b"Hello", b"H\xffllo"), b"[" * 100_000])
    def test_not_a_json_object(self, body):
        assert usage_from_json(body) == EMPTY_REPORT

    @pytest.mark.parametrize("payload", HOSTILE_PAYLOADS, ids=range(len(HOSTILE_PAYLOADS)))
    def test_hostile_bodies_give_no_usage(self, payload):
        report = usage_from_json(payload)
        assert (report.input_tokens, report.output_tokens, report.cost_msats) == (None, None, None)


class TestCostHeader:
    @pytest.mark.parametrize("name", ["x-routstr-cost-msats", "X-Routstr-Cost-Msats", "X-ROUTSTR-COST-MSATS"])
    def test_case_insensitive(self, name):
        assert cost_msats_from_headers([("content-type", "application/json"), (name, "52")]) == 52

    def test_first_valid_value_of_repeated_headers(self):
        headers = [("x-routstr-cost-msats", "soon"), ("X-Routstr-Cost-Msats", "9"), ("x-routstr-cost-msats", "10")]
        assert cost_msats_from_headers(headers) == 9

    def test_surrounding_whitespace(self):
        assert cost_msats_from_headers([("x-routstr-cost-msats", " 52 ")]) == 52

    @pytest.mark.parametrize("value", ["", "abc", "-5", "5.0", "1e3", "+5", "5_000", "٥", "0x10", "1 2", "9" * 20])
    def test_garbage(self, value):
        assert cost_msats_from_headers([("x-routstr-cost-msats", value)]) is None

    def test_the_split_headers_are_not_the_total(self):
        headers = [("x-routstr-input-cost-msats", "37"), ("x-routstr-output-cost-msats", "15")]
        assert cost_msats_from_headers(headers) is None


@pytest.mark.parametrize("tokens,expected", [((1, 2), True), ((0, 0), True), ((1, None), False), ((None, 2), False)])
def test_has_usage_needs_both_counts(tokens, expected):
    assert UsageReport(*tokens, cost_msats=None, output_text="", complete=True).has_usage is expected


class TestCacheReads:
    def test_routstr_cost_object(self):
        body = json.dumps({"usage": {"prompt_tokens": 100, "completion_tokens": 5, "cost": {
            "total_msats": 40, "cache_read_input_tokens": 80, "cache_read_msats": 8}}}).encode()
        report = usage_from_json(body)
        assert (report.cache_read_tokens, report.cache_read_msats) == (80, 8)

    def test_openai_cached_tokens(self):
        body = json.dumps({"usage": {"prompt_tokens": 100, "completion_tokens": 5,
                                     "prompt_tokens_details": {"cached_tokens": 64}}}).encode()
        report = usage_from_json(body)
        assert (report.cache_read_tokens, report.cache_read_msats) == (64, None)

    def test_in_a_stream_the_usage_chunk_carries_them(self):
        usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 5,
                                                     "cost": {"cache_read_input_tokens": 30, "cache_read_msats": 3}}})
        report = observe([sse(usage.encode(), b"[DONE]")])
        assert (report.cache_read_tokens, report.cache_read_msats) == (30, 3)

    def test_garbage_is_ignored(self):
        body = json.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                     "cost": {"cache_read_input_tokens": "many", "cache_read_msats": -1}}}).encode()
        assert usage_from_json(body).cache_read_tokens is None


def _json_values(leaves: st.SearchStrategy) -> st.SearchStrategy:
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


# Everything JSON (and json.dumps's extensions) can hold: integers past 64 bits, NaN and infinities,
# lone surrogates (written as \ud800 escapes, or raw where ensure_ascii is off).
_LEAVES = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62, max_value=2**70)
           | st.integers(min_value=-2**70, max_value=-2**62) | st.floats() | st.text(max_size=8))


def _same(ours: Any, theirs: Any) -> bool:
    """Equal, NaN equal to NaN; the one thing allowed to differ: an integer beyond 64 bits that
    orjson reads as the nearest float."""
    if isinstance(ours, float) and isinstance(theirs, float):
        return ours == theirs or (ours != ours and theirs != theirs)
    if isinstance(ours, float) and type(theirs) is int and abs(theirs) >= 2**63:
        return ours == float(theirs)
    if isinstance(ours, list) and isinstance(theirs, list):
        return len(ours) == len(theirs) and all(_same(a, b) for a, b in zip(ours, theirs))
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return ours.keys() == theirs.keys() and all(_same(ours[k], theirs[k]) for k in ours)
    return type(ours) is type(theirs) and ours == theirs


def _outcome(parse, data):
    try:
        return "parsed", parse(data)
    except (ValueError, RecursionError) as exc:
        return "refused", type(exc)


@settings(max_examples=400, deadline=None)
@given(_json_values(_LEAVES), st.booleans(), st.data())
def test_provider_json_is_read_as_json_loads_reads_it(value, ascii_only, data):
    text = json.dumps(value, ensure_ascii=ascii_only)
    raw = text.encode("utf-8", "surrogatepass")
    cut = data.draw(st.integers(0, len(raw)))
    flip = data.draw(st.integers(0, 255))
    for sample in (text, raw, raw[:cut], raw[:cut] + bytes([flip]) + raw[cut:]):
        ours, theirs = _outcome(read_json, sample), _outcome(json.loads, sample)
        assert ours[0] == theirs[0], sample
        assert _same(ours[1], theirs[1]) if ours[0] == "parsed" else ours == theirs, sample


_AMOUNTS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62, max_value=2**70)
            | st.integers(max_value=-1) | st.floats() | st.text(max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "prompt_tokens": _AMOUNTS, "completion_tokens": _AMOUNTS, "cost_sats": _AMOUNTS,
    "cost": st.fixed_dictionaries({}, optional={"total_msats": _AMOUNTS, "cache_read_input_tokens": _AMOUNTS,
                                                "cache_read_msats": _AMOUNTS}),
    "prompt_tokens_details": st.fixed_dictionaries({}, optional={"cached_tokens": _AMOUNTS})}),
    st.text(max_size=20))
def test_usage_reads_the_same_as_with_json_loads(usage, content):
    # The figures arbstr takes from an answer are the same whichever parser read it, integers past
    # 64 bits included (refused as amounts either way).
    body = json.dumps({"choices": [{"message": {"content": content}}], "usage": usage}).encode()
    ours = usage_from_json(body)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(usage_module, "read_json", json.loads)
        theirs = usage_from_json(body)
    assert ours == theirs
    assert observe([sse(body, b"[DONE]")]) == _observed_with_json_loads(body)


def _observed_with_json_loads(body: bytes) -> UsageReport:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(usage_module, "read_json", json.loads)
        return observe([sse(body, b"[DONE]")])
