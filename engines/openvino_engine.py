"""OpenVINO GenAI engine: tries each device in preference order (NPU first by default).

On CPU and GPU one `ContinuousBatchingPipeline` serves every request (two threads calling
`LLMPipeline.generate` on one pipeline fail, and its streamer serves one prompt at a
time, so continuous batching is the way to share a model). An NPU compiles a
static-shape `LLMPipeline` and runs one request at a time.

The pipeline lives in a worker process (`openvino_worker.py`) because it holds the GIL
while it steps. This process keeps the model's tokenizer (OpenVINO reads it straight from
the GGUF or IR) and a reader thread that hands each step's tokens to the waiting
requests. If the worker dies, the engine reports unhealthy, fails what was in flight,
and starts a new worker in the background.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from engines.base import DeviceAttempt, EngineInfo
from engines.byte_level_decoder import CHECK_TEXT, ByteLevelDecoder, checked_decoder
from engines.model_files import describe_model
from engines.worker_process import ProcessEngine, worker_options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenVINOOptions:
    devices: tuple[str, ...] = ("NPU", "CPU")
    # "auto": a single-request LLMPipeline on NPU, continuous batching elsewhere.
    pipeline: str = "auto"
    kv_cache_size_gb: int = 1
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    npu_max_prompt_len: int = 1024
    npu_min_response_len: int = 256
    cache_dir: str | None = None


class OpenVINOTokenizer:
    """Adapts `openvino_genai.Tokenizer` (the model's own, from GGUF or IR) to `Tokenizer`."""

    def __init__(self, ov_tokenizer, model_path: str | None = None) -> None:
        self._tokenizer = ov_tokenizer
        self.eos_token_ids = frozenset({int(ov_tokenizer.get_eos_token_id())})
        self._fast_decoder = self._checked_fast_decoder(model_path) if model_path else None

    def _checked_fast_decoder(self, model_path: str):
        """A byte-table decoder, if one can be built and agrees with OpenVINO on every window."""
        decoder = ByteLevelDecoder.for_model(model_path)
        checked = checked_decoder(decoder, self.encode(CHECK_TEXT) + sorted(self.eos_token_ids),
                                  lambda windows: self._tokenizer.decode(windows, skip_special_tokens=True))
        if decoder is not None and checked is None:
            log.warning("openvino: the byte-level decoder disagrees with OpenVINO's; using OpenVINO's")
        return checked

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        return self._tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        # The chat template already writes every special token the model expects.
        encoded = self._tokenizer.encode(text, add_special_tokens=False)
        return encoded.input_ids.data[0].tolist()

    def decode(self, token_ids: Sequence[int]) -> str:
        if self._fast_decoder is not None:
            return self._fast_decoder.decode(token_ids)
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)


class OpenVINOEngine(ProcessEngine):
    kind = "openvino"
    worker_module = "engines.openvino_worker"

    def __init__(self, model_path, options: OpenVINOOptions = OpenVINOOptions()):
        super().__init__(model_path, num_workers=1)  # one pipeline batches every request
        self._options = options

    def _worker_options(self) -> dict:
        return worker_options(self._options)

    def _load_tokenizer(self) -> OpenVINOTokenizer:
        import openvino_genai as ov_genai  # heavy runtime: imported only by this engine

        return OpenVINOTokenizer(ov_genai.Tokenizer(self._model_path), self._model_path)

    def _engine_info(self, device: str, attempts: tuple[DeviceAttempt, ...], single: bool) -> EngineInfo:
        description = describe_model(self._model_path)
        context_length = description.context_length
        if single and device.upper().startswith("NPU"):
            context_length = self._options.npu_max_prompt_len + self._options.npu_min_response_len
        return EngineInfo(
            engine=self.kind, device=device, model_path=self._model_path,
            context_length=context_length, quantization=description.quantization,
            max_concurrency=1 if single else self._options.max_num_seqs, device_attempts=attempts)
