"""A GGUF loaded by transformers is saved as a plain float checkpoint, whatever quantizer marker it carries."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers", reason="needs `make install-prepare` (torch, transformers)")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from engines.prepare.checkpoint import drop_gguf_quantizer  # noqa: E402


def tiny_model_marked_as_gguf() -> LlamaForCausalLM:
    """What later transformers return for a GGUF: dequantized float weights, yet a quantizer and
    its config attached (an object save_pretrained cannot serialize stands in for the quantizer)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config)
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    model.config.quantization_config = {"quant_method": "gguf"}
    return model


def test_a_model_with_the_gguf_marker_cannot_be_saved_as_is(tmp_path):
    with pytest.raises(ValueError, match="not serializable"):
        tiny_model_marked_as_gguf().save_pretrained(tmp_path)


def test_dropping_the_marker_saves_the_same_float_weights(tmp_path):
    model = tiny_model_marked_as_gguf()
    drop_gguf_quantizer(model)
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="float32")
    for (name, original), (_, loaded) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(original, loaded), name


def test_integer_weights_are_refused_rather_than_saved():
    model = tiny_model_marked_as_gguf()
    model.model.embed_tokens.weight = torch.nn.Parameter(torch.zeros(64, 32, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="torch.int8"):
        drop_gguf_quantizer(model)
