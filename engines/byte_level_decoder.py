"""A table-driven decoder for byte-level BPE vocabularies (GPT-2 style: SmolLM2, Llama 3, Qwen).

The server decodes a short window of tokens for every token it streams. OpenVINO's
tokenizer costs about 0.1 ms a call and competes with the model for the cores; joining
bytes from a table costs microseconds. The table comes from the GGUF's own vocabulary and
is used only after it matched the runtime's decoder on sample text (see OpenVINOTokenizer).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from engines.gguf_metadata import read_gguf_metadata

_CONTROL_TOKEN = 3  # GGUF token type of special tokens, which decoding skips

# Text whose tokens split characters, spaces and digits in many ways: a decoder that agrees
# with the runtime's on every short window of it is trusted for serving.
CHECK_TEXT = (
    "Grüße aus Köln! naïve café, 東京 and emoji 🚀🙂. def f(x):\n    return x ** 2  # ok\n"
    "  The quick brown fox, 1234567890 -- “quotes” and ‘more’.")
_CHECK_WINDOW = 8


def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character map used to spell BPE tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in characters:
            characters[byte] = chr(256 + shifted)
            shifted += 1
    return {character: byte for byte, character in characters.items()}


class ByteLevelDecoder:
    def __init__(self, token_bytes: list[bytes], errors: str = "ignore"):
        self._token_bytes = token_bytes
        # How bytes that form no whole character come out: left out ("ignore", as OpenVINO's
        # GGUF tokenizer does) or as U+FFFD ("replace", as its converted HF tokenizers do).
        self.errors = errors

    def with_errors(self, errors: str) -> ByteLevelDecoder:
        return ByteLevelDecoder(self._token_bytes, errors)

    @classmethod
    def from_gguf(cls, path: str | Path) -> ByteLevelDecoder | None:
        """The decoder for a GGUF with a byte-level BPE ("gpt2") vocabulary, else None."""
        if Path(path).suffix.lower() != ".gguf":
            return None
        metadata = read_gguf_metadata(path, keep_arrays=True)
        if metadata.get("tokenizer.ggml.model") != "gpt2":
            return None
        tokens = metadata.get("tokenizer.ggml.tokens") or []
        types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        to_byte = _unicode_to_byte()
        table = []
        for token, token_type in zip(tokens, types):
            if token_type == _CONTROL_TOKEN or any(c not in to_byte for c in token):
                table.append(b"")
            else:
                table.append(bytes(to_byte[c] for c in token))
        return cls(table)

    @classmethod
    def from_tokenizer_json(cls, directory: str | Path) -> ByteLevelDecoder | None:
        """The decoder for a directory whose tokenizer.json is byte-level BPE, else None."""
        path = Path(directory) / "tokenizer.json"
        if not path.exists():
            return None
        spec = json.loads(path.read_text())
        model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
        if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
            return None
        vocab: dict[str, int] = model.get("vocab") or {}
        special = {token["id"] for token in spec.get("added_tokens", []) if token.get("special")}
        for token in spec.get("added_tokens", []):
            vocab.setdefault(token["content"], token["id"])
        to_byte = _unicode_to_byte()
        table = [b""] * (max(vocab.values(), default=-1) + 1)
        for token, index in vocab.items():
            if index not in special and all(c in to_byte for c in token):
                table[index] = bytes(to_byte[c] for c in token)
        return cls(table)

    @classmethod
    def for_model(cls, path: str | Path) -> ByteLevelDecoder | None:
        if Path(path).is_dir():
            return cls.from_tokenizer_json(path)
        return cls.from_gguf(path)

    def decode(self, token_ids: Sequence[int]) -> str:
        table = self._token_bytes
        data = b"".join(table[i] for i in token_ids if 0 <= i < len(table))
        return data.decode("utf-8", errors=self.errors)


def checked_decoder(decoder: ByteLevelDecoder | None, token_ids: Sequence[int],
                    reference: Callable[[list[list[int]]], Sequence[str]]) -> ByteLevelDecoder | None:
    """`decoder`, in whichever error mode reproduces `reference` on every window, else None.

    `token_ids` should be CHECK_TEXT (and an end-of-sequence token) as the tokenizer encodes
    it; `reference` decodes a batch of windows with the runtime's own decoder.
    """
    if decoder is None:
        return None
    ids = list(token_ids)
    windows = [ids[start:end] for start in range(len(ids))
               for end in range(start + 1, min(start + _CHECK_WINDOW, len(ids)) + 1)]
    expected = list(reference(windows))
    for errors in ("ignore", "replace"):
        candidate = decoder.with_errors(errors)
        if [candidate.decode(window) for window in windows] == expected:
            return candidate
    return None
