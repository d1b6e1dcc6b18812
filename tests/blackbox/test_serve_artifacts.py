"""Every artifact `lowbit prepare` makes is served by `lowbit serve` and answers the openai client."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.blackbox.conftest import ServerProcess

pytestmark = pytest.mark.blackbox


@pytest.mark.parametrize("target, env, engine, device", [
    ("openvino-cpu", {}, "openvino", "CPU"),
    ("onnxruntime-cpu", {}, "onnxruntime", "CPU"),
    # The NPU artifact, on a machine without an NPU: NPU first, then the CPU.
    ("openvino-npu", {"LOWBIT_DEVICE": "NPU,CPU"}, "openvino", "CPU"),
])
def test_prepared_artifact_is_served(prepared, server_logs, target, env, engine, device):
    artifact = prepared(target)
    process = ServerProcess(server_logs, f"artifact-{target}", env=env, args=["--model", str(artifact.path)])
    try:
        ready = process.wait_ready()
        model_id = f"{artifact.manifest['model_id']}-{target}"
        card = httpx.get(f"{process.base_url}/v1/models").json()["data"][0]
        assert (card["id"], card["engine"], card["device"]) == (model_id, engine, device)
        assert card["quantization"] == artifact.manifest["quantization"]["name"]
        assert ready["engines"][0]["engine"] == engine
        reply = process.client().chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=24)
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        streamed = process.client().chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "Say hello."}], temperature=0, max_tokens=8,
            stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        if engine == "onnxruntime":  # no presence/frequency penalties there: refused, not ignored
            with pytest.raises(openai.BadRequestError) as refused:
                process.client().chat.completions.create(
                    model=model_id, messages=[{"role": "user", "content": "Hi"}], presence_penalty=0.5)
            assert refused.value.body["param"] == "presence_penalty"
    finally:
        assert process.stop() == 0


def test_native_engine_serves_the_default_model_on_the_cpu(artifacts_dir, server_logs):
    pytest.importorskip("transformers", reason="needs `make install-prepare`")
    work = artifacts_dir / ".work"  # the GGUF's converted checkpoint is cached here
    work.mkdir(exist_ok=True)
    process = ServerProcess(server_logs, "native", env={
        "LOWBIT_ENGINE": "native", "LOWBIT_DEVICE": "cpu", "LOWBIT_CACHE_DIR": str(work)})
    try:
        process.wait_ready(timeout_s=300)
        card = httpx.get(f"{process.base_url}/v1/models").json()["data"][0]
        assert (card["engine"], card["device"], card["quantization"]) == ("native", "CPU", "fp32")
        reply = process.client().chat.completions.create(
            model=card["id"], messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=16)
        assert "Paris" in reply.choices[0].message.content
    finally:
        assert process.stop() == 0


def test_several_artifacts_side_by_side(prepared, server_logs):
    openvino, onnxruntime = prepared("openvino-cpu"), prepared("onnxruntime-cpu")
    process = ServerProcess(server_logs, "side-by-side", args=[
        "--model", str(openvino.path), "--model", str(onnxruntime.path)])
    try:
        ready = process.wait_ready()
        assert sorted(e["engine"] for e in ready["engines"]) == ["onnxruntime", "openvino"]
        models = httpx.get(f"{process.base_url}/v1/models").json()["data"]
        assert {m["id"] for m in models} == {"SmolLM2-135M-Instruct.Q4_1-openvino-cpu",
                                             "SmolLM2-135M-Instruct.Q4_1-onnxruntime-cpu"}
        for model in models:
            reply = process.client().chat.completions.create(
                model=model["id"], messages=[{"role": "user", "content": "Say hello."}], temperature=0, max_tokens=8)
            assert reply.choices[0].message.content and reply.model == model["id"]
    finally:
        assert process.stop() == 0
