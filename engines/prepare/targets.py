"""What each `--target` produces, and how its accuracy is measured and gated.

A target names an engine, a device and a quantization scheme. Thresholds are the largest
perplexity ratio (artifact / unquantized reference, on the evaluation text) that `prepare`
accepts; each default was set from what we measured on the default model (README).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from engines.prepare.evaluation import calibration_text_sha256


@dataclass(frozen=True)
class Scheme:
    format: str  # e.g. "openvino-ir"
    bits: int
    group_size: int  # -1: one group per output channel
    symmetric: bool
    algorithm: str  # e.g. "rtn (nncf data-free)"
    ratio: float = 1.0  # share of layers in `bits`; the rest stay 8-bit

    @property
    def name(self) -> str:
        grouping = "channel" if self.group_size < 0 else f"g{self.group_size}"
        return f"int{self.bits}-{'sym' if self.symmetric else 'asym'}-{grouping}"

    def as_dict(self) -> dict:
        return {**asdict(self), "name": self.name}


@dataclass(frozen=True)
class Target:
    name: str
    engine: str
    device: str
    scheme: Scheme
    max_perplexity_ratio: float
    build: Callable[[Path, Path, Scheme], None]  # (checkpoint, output dir, scheme)
    evaluate: Callable[[Path, list[int]], float]  # (artifact dir, token ids) -> perplexity


class UnknownTarget(ValueError):
    pass


def write_openvino_tokenizer(checkpoint: Path, out_dir: Path) -> None:
    """The model's tokenizer (and chat template) as OpenVINO models, which every engine reads."""
    import openvino as ov
    import openvino_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    tokenizer.save_pretrained(out_dir)  # tokenizer.json: lets the server decode from a byte table
    encoder, decoder = openvino_tokenizers.convert_tokenizer(tokenizer, with_detokenizer=True)
    ov.save_model(encoder, str(out_dir / "openvino_tokenizer.xml"))
    ov.save_model(decoder, str(out_dir / "openvino_detokenizer.xml"))


def build_openvino(checkpoint: Path, out_dir: Path, scheme: Scheme) -> None:
    """Export to an OpenVINO IR with NNCF weight compression, plus the tokenizer models."""
    from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig

    config = OVWeightQuantizationConfig(
        bits=scheme.bits, sym=scheme.symmetric, group_size=scheme.group_size, ratio=scheme.ratio,
        # NNCF refuses a group size that does not divide a layer's input (576 for SmolLM2-135M):
        # such layers fall back to the nearest group size that does.
        group_size_fallback="adjust")
    model = OVModelForCausalLM.from_pretrained(str(checkpoint), export=True, quantization_config=config,
                                               compile=False)
    model.save_pretrained(out_dir)
    write_openvino_tokenizer(checkpoint, out_dir)


def build_onnxruntime(checkpoint: Path, out_dir: Path, scheme: Scheme) -> None:
    """The onnxruntime-genai model builder, INT4 with the scheme's block size, accuracy level 4."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as cache, open(out_dir / "builder.log", "w") as log:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint),
                   "-o", str(out_dir), "-p", "int4", "-e", "cpu", "-c", cache,
                   "--extra_options", f"int4_block_size={scheme.group_size}", "int4_accuracy_level=4"]
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "\n".join((out_dir / "builder.log").read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"the onnxruntime-genai builder failed (exit {result.returncode}):\n{tail}")
    (out_dir / "builder.log").unlink()
    write_openvino_tokenizer(checkpoint, out_dir)


def check_npu_weight_format(artifact: Path) -> dict:
    """What an Intel NPU needs: every compressed weight 4-bit symmetric, one scale per channel.

    Returns counts by weight type; raises ValueError naming the first weight that breaks it.
    """
    import openvino as ov

    model = ov.Core().read_model(str(artifact / "openvino_model.xml"))
    counts: dict[str, int] = {}
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Constant" or node.get_element_type() not in (ov.Type.i4, ov.Type.u4):
            continue
        kind = node.get_element_type().get_type_name()  # "i4" or "u4"
        counts[kind] = counts.get(kind, 0) + 1
        consumer = next(iter(node.output(0).get_target_inputs())).get_node()  # Convert to f16
        after = next(iter(consumer.output(0).get_target_inputs())).get_node()
        if node.get_element_type() != ov.Type.i4 or after.get_type_name() != "Multiply":
            raise ValueError(f"{node.get_friendly_name()}: {node.get_element_type()} weight followed by "
                             f"{after.get_type_name()} (an NPU needs i4 with a scale only)")
        scale_shape = list(after.input_value(1).get_partial_shape().to_shape())
        if len(scale_shape) != 2 or scale_shape[1] != 1:
            raise ValueError(f"{node.get_friendly_name()}: scale shape {scale_shape} is not one per channel")
    if not counts:
        raise ValueError("no 4-bit weights found")
    return counts


def build_openvino_npu(checkpoint: Path, out_dir: Path, scheme: Scheme) -> None:
    build_openvino(checkpoint, out_dir, scheme)
    check_npu_weight_format(out_dir)  # fails the build when the IR is not what an NPU runs

def _evaluate_openvino(artifact: Path, token_ids: list[int]) -> float:
    from engines.prepare.evaluation import perplexity_openvino

    return perplexity_openvino(artifact, token_ids)


def _evaluate_onnxruntime(artifact: Path, token_ids: list[int]) -> float:
    from engines.prepare.evaluation import perplexity_onnxruntime

    return perplexity_onnxruntime(artifact, token_ids)


def _build_native(checkpoint: Path, out_dir: Path, scheme: Scheme) -> None:
    from engines.prepare.evaluation import calibration_text
    from engines.prepare.native_int4 import build_native_int4

    build_native_int4(checkpoint, out_dir, calibration_text() if scheme.algorithm.startswith("awq") else None)


def _evaluate_native(artifact: Path, token_ids: list[int]) -> float:
    from engines.prepare.native_int4 import perplexity_native

    return perplexity_native(artifact, token_ids)


def _native(name: str, algorithm: str, threshold: float) -> Target:
    # Built for CUDA GPUs; evaluated through the engine's reference path on the CPU.
    return Target(name, "native", "CUDA", Scheme("lowbit-int4", 4, 128, False, algorithm), threshold,
                  _build_native, _evaluate_native)


def _openvino(name: str, device: str, scheme: Scheme, threshold: float, build=build_openvino) -> Target:
    return Target(name, "openvino", device, scheme, threshold, build, _evaluate_openvino)


TARGETS: dict[str, Target] = {
    target.name: target for target in (
        # INT4 asymmetric, group 128, data-free. Re-quantizing an already 4-bit GGUF loses
        # accuracy on a model this small; the threshold reflects what we measured.
        _openvino("openvino-cpu", "CPU", Scheme("openvino-ir", 4, 128, False, "rtn (nncf data-free)"), 1.40),
        # INT8 asymmetric per channel: close to the reference; the accurate choice.
        _openvino("openvino-cpu-int8", "CPU", Scheme("openvino-ir", 8, -1, False, "rtn (nncf data-free)"), 1.02),
        # INT4 symmetric, one scale per output channel, every layer: the format Intel NPUs run.
        # Built and evaluated on the CPU here (no NPU); far less accurate on a model this small.
        _openvino("openvino-npu", "NPU", Scheme("openvino-ir", 4, -1, True, "rtn (nncf data-free)"), 2.0,
                  build=build_openvino_npu),
        # INT4 through the onnxruntime-genai builder (MatMulNBits, block 32, accuracy level 4).
        Target("onnxruntime-cpu", "onnxruntime", "CPU", Scheme("onnx", 4, 32, False, "rtn (onnxruntime-genai builder)"),
               1.40, build_onnxruntime, _evaluate_onnxruntime),
        # lowbit's own INT4 (W4A16, group 128, 64 where a layer's inputs do not divide by 128)
        # for the native engine: data-free, or with activation-aware scales from the calibration text.
        _native("native", "rtn", 1.40),
        _native("native-awq", f"awq (calibration {calibration_text_sha256()[:12]})", 1.20),
    )
}

# Targets that have their own issues; named here so that users get a clear answer.
PLANNED: dict[str, str] = {
    "tensorrt-llm": "ModelOpt INT4-AWQ / NVFP4 for TensorRT-LLM",
}


def get_target(name: str) -> Target:
    if name in TARGETS:
        return TARGETS[name]
    if name in PLANNED:
        raise UnknownTarget(f"target '{name}' ({PLANNED[name]}) is not available yet")
    raise UnknownTarget(f"unknown target '{name}'; available: {', '.join(TARGETS)}")
