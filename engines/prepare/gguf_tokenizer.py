"""Build a Hugging Face tokenizer from a GGUF's own vocabulary, merges and special tokens.

transformers (5.5) turns this GGUF's byte-level BPE tokenizer into a SentencePiece-style
one: spaces become token 0, `<|im_start|>` is prepended to every input and the
end-of-sequence id is wrong. Building it from the metadata gives the same ids as the
tokenizer OpenVINO GenAI reads from the GGUF (checked by `tests/prepare`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engines.gguf_metadata import read_gguf_metadata

_CONTROL = 3  # GGUF token type of special tokens


class UnsupportedTokenizer(ValueError):
    pass


def build_tokenizer(gguf_path: str | Path):
    """A `PreTrainedTokenizerFast` equal to the GGUF's tokenizer (byte-level BPE only)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    metadata = read_gguf_metadata(gguf_path, keep_arrays=True)
    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise UnsupportedTokenizer(
            f"only byte-level BPE ('gpt2') GGUF tokenizers are rebuilt; this one is "
            f"{metadata.get('tokenizer.ggml.model')!r}")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges") or []]
    bpe = models.BPE(vocab={token: index for index, token in enumerate(tokens)}, merges=merges,
                     fuse_unk=False, byte_fallback=False)
    tokenizer = Tokenizer(bpe)
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
    if _splits_digits(metadata):
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(tokens, types) if kind == _CONTROL])

    def special(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and index < len(tokens) else None

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=special("bos"), eos_token=special("eos"),
        unk_token=special("unknown"), pad_token=special("padding") or special("eos"))
    wrapped.chat_template = metadata.get("tokenizer.chat_template")
    return wrapped


def _splits_digits(metadata: dict[str, Any]) -> bool:
    # llama.cpp's pre-tokenizer names; these split numbers into single digits.
    return metadata.get("tokenizer.ggml.pre") in {"smollm", "starcoder", "refact", "deepseek-coder"}
