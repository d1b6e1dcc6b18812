"""The `native` and `native-awq` targets: a checkpoint in lowbit's INT4 format for the native engine.

The q/k/v, o, gate/up and down projections of every layer become `.qweight`/`.scales`/`.zeros`
(engines/native/quantization.py); embeddings, norms and the LM head stay as they were.
- RTN (`native`): each group's [min, max] mapped to 0..15, data-free.
- AWQ (`native-awq`): before rounding, each input channel of a projection is scaled by s
  (chosen on the calibration text, see `awq_input_scales`) and 1/s is folded into whatever
  produces that input, so the float model is unchanged and its important channels keep more
  precision: input_layernorm for q/k/v, post_attention_layernorm for gate/up, the up
  projection's rows for down. o_proj is RTN (with grouped-query attention its input, the
  attention output, has no per-channel producer to fold into).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
QUANT_METHOD = "lowbit-int4"


def build_native_int4(checkpoint: Path, out_dir: Path, calibration_text: str | None) -> None:
    import torch
    from safetensors.torch import save_file

    from engines.native.model import read_checkpoint
    from engines.native.quantization import quantize_rtn

    config = json.loads((checkpoint / "config.json").read_text())
    state = {name: tensor.float() if tensor.is_floating_point() else tensor
             for name, tensor in read_checkpoint(checkpoint).items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    if calibration_text is not None:
        apply_awq_scales(checkpoint, state, config, calibration_text)
    out_state = {}
    for name, tensor in state.items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix.endswith(LINEARS):
            quantized = quantize_rtn(tensor)
            out_state.update({f"{prefix}.qweight": quantized.qweight, f"{prefix}.scales": quantized.scales,
                              f"{prefix}.zeros": quantized.zeros})
        else:
            out_state[name] = tensor.to(torch.bfloat16)
    save_file({name: tensor.contiguous() for name, tensor in out_state.items()}, str(out_dir / "model.safetensors"))
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "bits": 4, "group_size": 128, "zero_point": True,
                                     "algorithm": "awq" if calibration_text is not None else "rtn"}
    config["torch_dtype"] = "bfloat16"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for file in checkpoint.iterdir():  # tokenizer and chat template
        if file.is_file() and file.suffix != ".safetensors" and file.name != "config.json":
            shutil.copy2(file, out_dir / file.name)


def apply_awq_scales(checkpoint: Path, state: dict, config: dict, calibration_text: str) -> None:
    """Scale projections' input channels by AWQ scales (in place), folding 1/s into their producers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engines.native.quantization import awq_input_scales

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    token_ids = tokenizer(calibration_text, add_special_tokens=False).input_ids[:2048]
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    inputs: dict[str, list[torch.Tensor]] = {}

    def record(name: str):
        def hook(_module, args):
            inputs.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    handles = []
    for index, layer in enumerate(model.model.layers):
        for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
            handles.append(layer.get_submodule(name).register_forward_pre_hook(record(f"{index}.{name}")))
    with torch.no_grad():
        for start in range(0, len(token_ids), 512):  # the same windows the evaluation uses
            model(torch.tensor([token_ids[start:start + 512]]))
    for handle in handles:
        handle.remove()

    for index in range(config["num_hidden_layers"]):
        layer = f"model.layers.{index}."
        # down: input silu(gate) * up, produced by up_proj's rows.
        scales = awq_input_scales([state[f"{layer}mlp.down_proj.weight"]], torch.cat(inputs[f"{index}.mlp.down_proj"]))
        state[f"{layer}mlp.down_proj.weight"] *= scales[None, :]
        state[f"{layer}mlp.up_proj.weight"] /= scales[:, None]
        # gate/up: input post_attention_layernorm(x).
        _scale_pair(state, layer, ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm",
                    torch.cat(inputs[f"{index}.mlp.gate_proj"]))
        # q/k/v: input input_layernorm(x).
        _scale_pair(state, layer, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm",
                    torch.cat(inputs[f"{index}.self_attn.q_proj"]))


def _scale_pair(state: dict, layer: str, projections: tuple[str, ...], norm: str, inputs) -> None:
    from engines.native.quantization import awq_input_scales

    weights = [state[f"{layer}{name}.weight"] for name in projections]
    scales = awq_input_scales(weights, inputs)
    for name in projections:
        state[f"{layer}{name}.weight"] *= scales[None, :]
    state[f"{layer}{norm}.weight"] /= scales


def perplexity_native(artifact: Path, token_ids: list[int]) -> float:
    """Perplexity through the native engine's reference path (CPU, float32, INT4 dequantized)."""
    import math

    import numpy as np

    from engines.base import SamplingParams
    from engines.native.block_manager import BlockManager
    from engines.native.model_runner import ModelRunner, RunnerConfig
    from engines.native.sequence import Sequence
    from engines.prepare.evaluation import WINDOW_TOKENS, _nll_sum, _windows

    runner = ModelRunner(RunnerConfig("cpu", "float32", 16, kv_cache_tokens=WINDOW_TOKENS + 16), checkpoint=artifact)
    manager = BlockManager(runner.num_blocks, 16)
    total, count = 0.0, 0
    for window in _windows(token_ids):
        seq = Sequence("evaluation", list(window), SamplingParams(max_tokens=1))
        manager.allocate(seq)
        logits = runner.logits([seq], True, every_position=True).numpy()
        manager.free(seq)
        total += _nll_sum(np.asarray(logits), window)
        count += len(window) - 1
    return math.exp(total / count)
