"""Perplexity on the committed evaluation text, computed the same way for every format.

The text (`data/evaluation.txt`) is English prose written for the project; it is never used
for calibration (`data/calibration.txt` is). Tokens are scored in non-overlapping windows,
each starting with an empty cache; perplexity = exp(mean negative log-likelihood).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
WINDOW_TOKENS = 512


def evaluation_text() -> str:
    return (DATA / "evaluation.txt").read_text()


def evaluation_text_sha256() -> str:
    return hashlib.sha256(evaluation_text().encode()).hexdigest()


def calibration_text() -> str:
    """Text for activation-aware quantization; separate from the evaluation text, so the gate stays fair."""
    return (DATA / "calibration.txt").read_text()


def calibration_text_sha256() -> str:
    return hashlib.sha256(calibration_text().encode()).hexdigest()


def _windows(token_ids: list[int]) -> list[list[int]]:
    return [token_ids[i:i + WINDOW_TOKENS] for i in range(0, len(token_ids), WINDOW_TOKENS)
            if len(token_ids[i:i + WINDOW_TOKENS]) > 1]


def _nll_sum(logits: np.ndarray, window: list[int]) -> float:
    """Summed negative log-likelihood of window[1:] given logits [len(window), vocab]."""
    logits = logits[:-1].astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return float(-log_probs[np.arange(len(window) - 1), window[1:]].sum())


def perplexity_checkpoint(checkpoint: Path, token_ids: list[int]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for window in _windows(token_ids):
            logits = model(torch.tensor([window])).logits[0].numpy()
            total += _nll_sum(logits, window)
            count += len(window) - 1
    return math.exp(total / count)


def perplexity_openvino(model_dir: Path, token_ids: list[int]) -> float:
    import openvino as ov

    compiled = ov.Core().compile_model(str(model_dir / "openvino_model.xml"), "CPU")
    request = compiled.create_infer_request()
    input_names = {port.get_any_name() for port in compiled.inputs}
    total, count = 0.0, 0
    for window in _windows(token_ids):
        request.reset_state()
        length = len(window)
        inputs = {"input_ids": np.array([window], dtype=np.int64),
                  "attention_mask": np.ones((1, length), dtype=np.int64)}
        if "position_ids" in input_names:
            inputs["position_ids"] = np.arange(length, dtype=np.int64)[None]
        if "beam_idx" in input_names:
            inputs["beam_idx"] = np.zeros(1, dtype=np.int32)
        logits = request.infer(inputs)[compiled.output("logits")][0]
        total += _nll_sum(logits, window)
        count += length - 1
    return math.exp(total / count)


def perplexity_onnxruntime(model_dir: Path, token_ids: list[int]) -> float:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    total, count = 0.0, 0
    for window in _windows(token_ids):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(window) + 1)
        generator = og.Generator(model, params)  # a fresh generator: an empty cache
        generator.append_tokens(window)
        logits = np.asarray(generator.get_output("logits"))[0]
        total += _nll_sum(logits, window)
        count += len(window) - 1
    return math.exp(total / count)
