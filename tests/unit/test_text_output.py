"""Incremental detokenizing and stop strings, with tokenizers that split characters."""

from __future__ import annotations

from engines.base import FinishReason, GenerationChunk
from app.text_output import IncrementalDetokenizer, StopStringMatcher, TextOutput
from tests.fakes import CharTokenizer


class ByteTokenizer:
    """One token per UTF-8 byte: multi-byte characters span several tokens."""

    eos_token_ids = frozenset({256})

    def apply_chat_template(self, messages):
        return ""

    def encode(self, text):
        return list(text.encode())

    def decode(self, token_ids):
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")


def test_detokenizer_never_emits_half_a_character():
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    emitted = [detokenizer.push([byte]) for byte in "añ€x".encode()]
    assert "\ufffd" not in "".join(emitted)
    assert "".join(emitted) == "añ€x"
    assert emitted[1] == "" and emitted[2] == "ñ"  # ñ is two bytes: nothing after the first


def test_detokenizer_flushes_an_incomplete_tail_at_the_end():
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    assert detokenizer.push(["€".encode()[0]]) == ""
    assert detokenizer.flush() == "\ufffd"


def test_stop_matcher_finds_a_stop_split_across_chunks():
    matcher = StopStringMatcher(("STOP",))
    assert matcher.feed("abc ST") == ("abc ", False)  # "ST" is held back
    assert matcher.feed("OP tail") == ("", True)


def test_stop_matcher_releases_held_text_that_did_not_match():
    matcher = StopStringMatcher(("STOP",))
    assert matcher.feed("xS") == ("x", False)
    assert matcher.feed("ay") == ("Say", False)


def test_stop_matcher_picks_the_earliest_of_several_stops():
    matcher = StopStringMatcher(("world", "lo"))
    assert matcher.feed("hello world") == ("hel", True)


def test_text_output_counts_tokens_and_maps_finish_reasons():
    output = TextOutput(CharTokenizer(), ())
    assert output.push(GenerationChunk((ord("h"), ord("i")))).text == "hi"
    last = output.push(GenerationChunk((0,), FinishReason.STOP))
    assert last.finish_reason == "stop" and output.num_generated_tokens == 3
    capped = TextOutput(CharTokenizer(), ())
    assert capped.push(GenerationChunk((ord("a"),), FinishReason.LENGTH)).finish_reason == "length"


def test_text_output_stop_string_ends_the_answer_and_ignores_later_chunks():
    output = TextOutput(CharTokenizer(), ("c",))
    delta = output.push(GenerationChunk(tuple(map(ord, "abcd"))))
    assert (delta.text, delta.finish_reason) == ("ab", "stop")
    assert output.push(GenerationChunk((ord("e"),))).text == ""
