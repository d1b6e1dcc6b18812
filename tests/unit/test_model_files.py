"""Reading GGUF headers and describing model files."""

from __future__ import annotations

import struct

import pytest

from app.default_model import default_model_path
from engines.gguf_metadata import GGUFFormatError, read_gguf_metadata
from engines.model_files import describe_model


def write_gguf(path, pairs: list[tuple[str, int, bytes]]) -> None:
    """A minimal GGUF v3 header with the given (key, type, packed value) pairs, no tensors."""
    with open(path, "wb") as out:
        out.write(b"GGUF" + struct.pack("<IQQ", 3, 0, len(pairs)))
        for key, value_type, value in pairs:
            out.write(struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", value_type) + value)


def gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def test_reads_scalars_strings_and_skips_arrays(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, [
        ("general.architecture", 8, gguf_string("llama")),
        ("llama.context_length", 4, struct.pack("<I", 4096)),
        ("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 3) + struct.pack("<3f", 1, 2, 3)),
        ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + gguf_string("a") + gguf_string("bc")),
        ("general.file_type", 4, struct.pack("<I", 15)),
    ])
    metadata = read_gguf_metadata(path)
    assert metadata["llama.context_length"] == 4096
    assert metadata["tokenizer.ggml.scores"] is None
    assert read_gguf_metadata(path, keep_arrays=True)["tokenizer.ggml.tokens"] == ["a", "bc"]
    description = describe_model(path)
    assert (description.context_length, description.quantization, description.name) == (4096, "gguf-q4_k_m", "tiny")


def test_the_embedded_default_model_is_smollm2_q4_1_with_8k_context():
    description = describe_model(default_model_path())
    assert description.format == "gguf"
    assert description.context_length == 8192
    assert description.quantization == "gguf-q4_1"


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"nope" + bytes(20))
    with pytest.raises(GGUFFormatError):
        read_gguf_metadata(path)
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="neither a .gguf file"):
        describe_model(tmp_path / "model.bin")


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        describe_model(tmp_path / "absent.gguf")


def test_model_directory_reads_context_length_from_config(tmp_path):
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 2048}')
    (tmp_path / "openvino_model.xml").write_text("<net/>")
    description = describe_model(tmp_path)
    assert (description.format, description.context_length, description.quantization) == \
        ("directory", 2048, "openvino-ir")
