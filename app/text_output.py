"""Turn an engine's token ids into text deltas for the wire, and apply stop strings.

Both live on the HTTP side so that every engine gets identical text handling: the
engine only reports token ids and why it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.base import FinishReason, GenerationChunk, Tokenizer

_REPLACEMENT_CHAR = "\ufffd"  # a token that ends inside a multi-byte UTF-8 character


class IncrementalDetokenizer:
    """Decodes a growing list of token ids into text deltas.

    Decoding one token at a time is wrong for byte-level and SentencePiece tokenizers
    (leading spaces, characters split over tokens), so each step decodes a short window
    ending at the new tokens and emits what the window adds to the text already emitted.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._token_ids: list[int] = []
        self._prefix_offset = 0  # window start: a few tokens before the unread ones
        self._read_offset = 0  # tokens before this index have been emitted as text

    def push(self, token_ids: tuple[int, ...] | list[int]) -> str:
        if not token_ids:
            return ""
        self._token_ids.extend(token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end: emit whatever is left, even an incomplete character."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read_offset >= len(self._token_ids):
            return ""
        window_start = self._tokenizer.decode(self._token_ids[self._prefix_offset:self._read_offset])
        window = self._tokenizer.decode(self._token_ids[self._prefix_offset:])
        if len(window) <= len(window_start) or (window.endswith(_REPLACEMENT_CHAR) and not final):
            return ""  # wait for the rest of the character
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return window[len(window_start):]


class StopStringMatcher:
    """Finds the first stop string in streamed text, holding back a possible partial match."""

    def __init__(self, stop_strings: tuple[str, ...]):
        self._stops = stop_strings
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was found)."""
        if not self._stops:
            return text, False
        buffer = self._held + text
        positions = [buffer.find(stop) for stop in self._stops]
        found = [position for position in positions if position >= 0]
        if found:
            self._held = ""
            return buffer[:min(found)], True
        hold = self._partial_match_length(buffer)
        self._held = buffer[len(buffer) - hold:]
        return buffer[:len(buffer) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_match_length(self, buffer: str) -> int:
        """Length of the longest end of `buffer` that begins some stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if stop.startswith(buffer[-length:]):
                    longest = length
                    break
        return longest


@dataclass(frozen=True)
class TextDelta:
    text: str
    finish_reason: str | None = None  # "stop" or "length" once the answer is complete


class TextOutput:
    """Feeds engine chunks through the detokenizer and stop matcher; counts tokens."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: tuple[str, ...]):
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopStringMatcher(stop_strings)
        self.num_generated_tokens = 0
        self.finish_reason: str | None = None

    def push(self, chunk: GenerationChunk) -> TextDelta:
        """Returns the text to send; `finish_reason` set means the answer is complete."""
        if self.finish_reason is not None:
            return TextDelta("")
        self.num_generated_tokens += len(chunk.token_ids)
        text = self._detokenizer.push(chunk.token_ids)
        if chunk.finish_reason is not None:
            text += self._detokenizer.flush()
        text, stopped = self._stops.feed(text)
        if stopped:
            self.finish_reason = "stop"
        elif chunk.finish_reason is not None:
            text += self._stops.flush()
            self.finish_reason = "length" if chunk.finish_reason == FinishReason.LENGTH else "stop"
        return TextDelta(text, self.finish_reason)
