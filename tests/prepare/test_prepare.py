"""`lowbit prepare` on the real default model: tokenizer repair, artifacts, reuse, the gate."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

pytest.importorskip("optimum.intel", reason="conversion tools not installed (make install-prepare)")

from app.default_model import default_model_path  # noqa: E402
from engines.base import GenerationRequest, SamplingParams  # noqa: E402
from engines.prepare.evaluation import evaluation_text  # noqa: E402
from engines.prepare.gguf_tokenizer import build_tokenizer  # noqa: E402
from engines.prepare.pipeline import MANIFEST, AccuracyGateFailed, prepare  # noqa: E402
from engines.prepare.targets import UnknownTarget  # noqa: E402

SAMPLES = ["Hello world", "<|im_start|>user\nHi there! Grüße 🚀<|im_end|>\n",
           "  leading spaces and\ttabs\n\nnumbers 12345 3.14", "It's don't I'll we've", "def f(x):\n    return x**2"]


@pytest.fixture(scope="module")
def out_dir(artifacts_dir):
    return artifacts_dir


@pytest.fixture(scope="module")
def int8_artifact(out_dir):
    lines = []
    (artifact,) = prepare(default_model_path(), ["openvino-cpu-int8"], out_dir, progress=lines.append)
    return artifact, lines


def test_rebuilt_tokenizer_gives_the_ids_openvino_genai_reads_from_the_gguf():
    import openvino_genai

    ours = build_tokenizer(default_model_path())
    theirs = openvino_genai.Tokenizer(str(default_model_path()))
    for text in SAMPLES + [evaluation_text()]:
        expected = theirs.encode(text, add_special_tokens=False).input_ids.data[0].tolist()
        assert ours(text, add_special_tokens=False).input_ids == expected
    assert (ours.eos_token, ours.eos_token_id) == ("<|im_end|>", 2)
    assert ours("Hi").input_ids[0] != ours.bos_token_id  # nothing is prepended


def test_int8_artifact_passes_the_gate_with_a_complete_manifest(int8_artifact):
    artifact, lines = int8_artifact
    manifest = json.loads((artifact.path / MANIFEST).read_text())
    assert manifest["target"] == "openvino-cpu-int8" and manifest["engine"] == "openvino"
    assert manifest["device"] == "CPU"
    assert manifest["source"]["format"] == "gguf" and len(manifest["source"]["sha256"]) == 64
    assert manifest["quantization"]["bits"] == 8 and manifest["quantization"]["symmetric"] is False
    evaluation = manifest["evaluation"]
    assert evaluation["passed"] and evaluation["ratio"] <= evaluation["max_ratio"] == 1.02
    assert evaluation["perplexity"] > 1 and evaluation["tokens"] > 1000
    assert manifest["tools"]["nncf"] and manifest["tools"]["openvino"]
    assert any("perplexity" in line and "pass" in line for line in lines)  # the figures are printed
    assert (artifact.path / "openvino_tokenizer.xml").exists()


def test_a_repeated_prepare_reuses_the_finished_artifact(out_dir, int8_artifact):
    artifact, _ = int8_artifact
    lines = []
    (again,) = prepare(default_model_path(), ["openvino-cpu-int8"], out_dir, progress=lines.append)
    assert again.reused and again.path == artifact.path
    assert not any("build" in line for line in lines)


def test_the_artifact_serves_through_the_engine(int8_artifact):
    from app.server import resolve_model
    from app.settings import EngineSpec
    from engines.openvino_engine import OpenVINOEngine, OpenVINOOptions

    artifact, _ = int8_artifact
    path, model_id, spec = resolve_model(EngineSpec(model=str(artifact.path)))
    assert spec.device == ("CPU",) and spec.engine == "openvino"  # from the manifest
    assert model_id == "SmolLM2-135M-Instruct.Q4_1-openvino-cpu-int8"
    engine = OpenVINOEngine(path, OpenVINOOptions(devices=spec.device))
    engine.start()
    try:
        assert engine.info.quantization == "int8-asym-channel"
        tokenizer = engine.tokenizer
        prompt = tuple(tokenizer.encode(tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}])))

        async def answer() -> str:
            tokens = []
            request = GenerationRequest("q", prompt, SamplingParams(max_tokens=20, temperature=0))
            async for chunk in engine.generate(request):
                tokens.extend(chunk.token_ids)
            return tokenizer.decode(tokens)

        assert "Paris" in asyncio.run(answer())
    finally:
        engine.stop()


def test_the_gate_refuses_a_corrupted_artifact_and_keeps_nothing(out_dir, int8_artifact):
    def corrupt_scales(staging):
        # Multiply every weight scale by 3: the model still runs, but badly.
        import numpy as np
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(staging / "openvino_model.xml"))
        for node in model.get_ordered_ops():
            if node.get_type_name() == "Multiply":
                scale = node.input_value(1).get_node()
                if scale.get_type_name() == "Constant" and scale.get_element_type() == ov.Type.f16:
                    data = np.array(scale.get_data(), dtype=np.float16) * 3
                    node.input(1).replace_source_output(ov.opset13.constant(data).output(0))
        ov.save_model(model, str(staging / "corrupt.xml"))
        (staging / "corrupt.xml").replace(staging / "openvino_model.xml")
        (staging / "corrupt.bin").replace(staging / "openvino_model.bin")

    other = out_dir.parent / "refused"
    with pytest.raises(AccuracyGateFailed, match="above the limit"):
        prepare(default_model_path(), ["openvino-cpu-int8"], other, progress=lambda _: None, corrupt=corrupt_scales,
                work_dir=out_dir / ".work")
    assert list(other.iterdir()) == []  # no artifact, no staging left


def test_unknown_and_planned_targets_are_clear_errors(tmp_path):
    with pytest.raises(UnknownTarget, match="not available yet"):
        prepare(default_model_path(), ["tensorrt-llm"], tmp_path)
    with pytest.raises(UnknownTarget, match="available: openvino-cpu.*native-awq"):
        prepare(default_model_path(), ["nonsense"], tmp_path)


def test_cli_prints_the_table_and_exits_zero(out_dir, int8_artifact):
    result = subprocess.run([sys.executable, "-m", "app.cli", "prepare", "--target", "openvino-cpu-int8",
                             "--out", str(out_dir)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "openvino-cpu-int8" in result.stdout and "reusing" in result.stdout
    assert "lowbit serve --model" in result.stdout


def test_npu_target_has_the_npu_weight_format_and_runs_on_the_cpu(prepared):
    from engines.prepare.targets import check_npu_weight_format

    artifact = prepared("openvino-npu")
    counts = check_npu_weight_format(artifact.path)
    assert counts.get("i4", 0) > 0 and "u4" not in counts
    manifest = artifact.manifest
    assert manifest["device"] == "NPU" and manifest["run_on_target_device"] is False
    assert manifest["quantization"]["symmetric"] and manifest["quantization"]["group_size"] == -1


def test_npu_format_check_rejects_an_asymmetric_grouped_ir(prepared):
    from engines.prepare.targets import check_npu_weight_format

    with pytest.raises(ValueError):
        check_npu_weight_format(prepared("openvino-cpu").path)


def test_onnxruntime_artifact_passes_its_gate(prepared):
    manifest = prepared("onnxruntime-cpu").manifest
    assert manifest["engine"] == "onnxruntime" and manifest["quantization"]["group_size"] == 32
    assert manifest["evaluation"]["passed"] and manifest["evaluation"]["ratio"] <= 1.40


def test_native_int4_targets_pass_their_gates_and_awq_beats_rtn(prepared):
    from safetensors import safe_open

    rtn, awq = prepared("native").manifest, prepared("native-awq").manifest
    for manifest, limit in ((rtn, 1.40), (awq, 1.20)):
        assert manifest["engine"] == "native" and manifest["device"] == "CUDA"
        assert manifest["evaluated_on"] == "CPU" and manifest["run_on_target_device"] is False
        assert manifest["evaluation"]["passed"] and manifest["evaluation"]["ratio"] <= limit
    assert awq["quantization"]["algorithm"].startswith("awq (calibration ")
    assert awq["evaluation"]["ratio"] < rtn["evaluation"]["ratio"]  # the calibration pays
    path = prepared("native-awq").path
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "lowbit-int4"
    with safe_open(str(path / "model.safetensors"), "pt") as tensors:
        names = set(tensors.keys())
        qweight = tensors.get_tensor("model.layers.0.mlp.down_proj.qweight")
    assert "model.layers.0.self_attn.q_proj.weight" not in names and "model.embed_tokens.weight" in names
    assert str(qweight.dtype) == "torch.int32" and tuple(qweight.shape) == (576, 1536 // 8)


def test_native_engine_reports_the_int4_format_of_a_prepared_artifact(prepared):
    from engines.registry import build_engine

    engine = build_engine("native", prepared("native").path, ("cpu",), {"kv_cache_tokens": 2048})
    engine.start()
    try:
        assert engine.info.quantization == "int4-w4a16" and engine.info.engine == "native"
        ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]))
        request = GenerationRequest("int4", tuple(ids), SamplingParams(max_tokens=8, temperature=0.0))

        async def run():
            return [token async for chunk in engine.generate(request) for token in chunk.token_ids]

        assert len(asyncio.run(run())) >= 1
    finally:
        engine.stop()
