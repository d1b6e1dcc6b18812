"""A table-driven decoder for byte-level BPE vocabularies (GPT-2 style: SmolLM2, Llama 3, Qwen).

The server decodes a short window of tokens for every token it streams. OpenVINO's
tokenizer costs about 0.1 ms a call and competes with the model for the cores; joining
bytes from a table costs microseconds. The table comes from the GGUF's own vocabulary and
is used only after it matched the runtime's decoder on sample text (see OpenVINOTokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from engines.gguf_metadata import read_gguf_metadata

_CONTROL_TOKEN = 3  # GGUF token type of special tokens, which decoding skips


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
    def __init__(self, token_bytes: list[bytes]):
        self._token_bytes = token_bytes

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

    def decode(self, token_ids: Sequence[int]) -> str:
        table = self._token_bytes
        data = b"".join(table[i] for i in token_ids if 0 <= i < len(table))
        # Like OpenVINO's decoder: bytes that do not form a whole character are left out.
        return data.decode("utf-8", errors="ignore")
