"""Build an engine by kind, importing its module (and its heavy runtime) only when asked."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engines.base import Engine

ENGINE_KINDS = ("openvino", "onnxruntime", "native")


def build_engine(kind: str, model_path: str | Path, devices: tuple[str, ...],
                 options: Mapping[str, Any]) -> Engine:
    """An engine of `kind`, not yet started. `options` are the kind's own settings."""
    if kind == "openvino":
        from engines.openvino_engine import OpenVINOEngine, OpenVINOOptions

        known = set(OpenVINOOptions.__dataclass_fields__)
        return OpenVINOEngine(model_path, OpenVINOOptions(devices=devices, **{k: v for k, v in options.items() if k in known}))
    if kind == "onnxruntime":
        from engines.onnxruntime_engine import OnnxRuntimeEngine, OnnxRuntimeOptions

        known = set(OnnxRuntimeOptions.__dataclass_fields__) - {"provider"}
        # The first device names the execution provider: cpu, cuda, dml, QNN, OpenVINO.
        provider = devices[0] if devices else "cpu"
        return OnnxRuntimeEngine(model_path, OnnxRuntimeOptions(
            provider=provider, **{k: v for k, v in options.items() if k in known}))
    if kind == "native":
        from engines.native.engine import NativeEngine, NativeOptions

        # The first CPU or CUDA device in the preference list (NPU entries do not apply).
        device = next((d.lower() for d in devices if d.lower() == "cpu" or d.lower().startswith("cuda")), "cpu")
        known = set(NativeOptions.__dataclass_fields__) - {"device"}
        return NativeEngine(model_path, NativeOptions(device=device, **{k: v for k, v in options.items() if k in known}))
    raise ValueError(f"unknown engine kind {kind!r}; known: {', '.join(ENGINE_KINDS)}")
