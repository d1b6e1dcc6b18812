"""ONNX Runtime GenAI engine: a pool of worker processes, each running one request at a time.

One `og.Model` per worker process and one generator per request. Several workers let
concurrent requests run in parallel (a generator step holds the GIL, so threads in one
process do not; see `onnxruntime_worker.py`). The execution provider comes from settings
(`cpu` by default; `cuda`, `dml`, `QNN`, `OpenVINO` are passed to `og.Config`). The
tokenizer runs here, from the OpenVINO tokenizer models `lowbit prepare` writes beside the
ONNX model, so that the model is not loaded twice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from engines.base import DeviceAttempt, EngineError, EngineInfo
from engines.model_files import describe_model
from engines.openvino_engine import OpenVINOTokenizer
from engines.worker_process import ProcessEngine


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    provider: str = "cpu"
    num_workers: int = 0  # 0: one per core
    intra_op_threads: int = 0  # 0: the cores shared out among the workers


class OnnxRuntimeEngine(ProcessEngine):
    kind = "onnxruntime"
    worker_module = "engines.onnxruntime_worker"

    def __init__(self, model_path, options: OnnxRuntimeOptions = OnnxRuntimeOptions()):
        cores = os.cpu_count() or 1
        workers = options.num_workers or cores
        super().__init__(model_path, num_workers=workers)
        self._options = options
        self._intra_op_threads = options.intra_op_threads or max(1, cores // workers)
        config_file = Path(model_path) / "genai_config.json"
        if not config_file.exists():
            raise EngineError(self.kind, f"{model_path} has no genai_config.json (not an ONNX Runtime GenAI model)")
        self._genai_config = json.loads(config_file.read_text())["model"]

    def _worker_options(self) -> dict:
        eos = self._genai_config.get("eos_token_id", [])
        return {"provider": self._options.provider, "intra_op_threads": self._intra_op_threads,
                "eos_token_ids": eos if isinstance(eos, list) else [eos]}

    def _load_tokenizer(self) -> OpenVINOTokenizer:
        import openvino_genai as ov_genai

        if not (Path(self._model_path) / "openvino_tokenizer.xml").exists():
            raise EngineError(self.kind, f"{self._model_path} has no openvino_tokenizer.xml; "
                                         "prepare the model with `lowbit prepare --target onnxruntime-cpu`")
        return OpenVINOTokenizer(ov_genai.Tokenizer(self._model_path), self._model_path)

    def _engine_info(self, device: str, attempts: tuple[DeviceAttempt, ...], single: bool) -> EngineInfo:
        description = describe_model(self._model_path)
        return EngineInfo(
            engine=self.kind, device=device, model_path=self._model_path,
            context_length=int(self._genai_config.get("context_length") or description.context_length),
            quantization=description.quantization, max_concurrency=self._num_workers, device_attempts=attempts,
            supports_penalties=False)  # onnxruntime-genai has a repetition penalty only
