"""The byte-table decoder agrees with OpenVINO's own decoder on the real default model."""

from __future__ import annotations

import pytest

from app.default_model import default_model_path
from engines.byte_level_decoder import ByteLevelDecoder, _unicode_to_byte

SAMPLE = "Grüße! 東京 🚀 — “quoted” text, code: x**2 # ok\n\tindented"


def test_the_byte_alphabet_covers_every_byte_once():
    mapping = _unicode_to_byte()
    assert sorted(mapping.values()) == list(range(256))
    assert mapping["!"] == ord("!") and mapping["Ġ"] == ord(" ")  # GPT-2 spells a space as Ġ


@pytest.fixture(scope="module")
def openvino_tokenizer():
    openvino_genai = pytest.importorskip("openvino_genai")
    return openvino_genai.Tokenizer(str(default_model_path()))


def test_matches_openvino_on_every_window_including_split_characters(openvino_tokenizer):
    decoder = ByteLevelDecoder.from_gguf(default_model_path())
    assert decoder is not None
    ids = openvino_tokenizer.encode(SAMPLE, add_special_tokens=False).input_ids.data[0].tolist()
    windows = [ids[start:end] for start in range(len(ids)) for end in range(start + 1, min(start + 6, len(ids)) + 1)]
    expected = openvino_tokenizer.decode(windows, skip_special_tokens=True)
    assert [decoder.decode(window) for window in windows] == list(expected)
    assert decoder.decode(ids) == SAMPLE


def test_special_tokens_decode_to_nothing(openvino_tokenizer):
    decoder = ByteLevelDecoder.from_gguf(default_model_path())
    eos = openvino_tokenizer.get_eos_token_id()
    assert decoder.decode([eos]) == ""


def test_not_for_non_gguf_models(tmp_path):
    assert ByteLevelDecoder.from_gguf(tmp_path) is None
