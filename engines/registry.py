"""Build an engine by kind, importing its module (and its heavy runtime) only when asked."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engines.base import Engine

ENGINE_KINDS = ("openvino",)


def build_engine(kind: str, model_path: str | Path, devices: tuple[str, ...],
                 options: Mapping[str, Any]) -> Engine:
    """An engine of `kind`, not yet started. `options` are the kind's own settings."""
    if kind == "openvino":
        from engines.openvino_engine import OpenVINOEngine, OpenVINOOptions

        return OpenVINOEngine(model_path, OpenVINOOptions(devices=devices, **options))
    raise ValueError(f"unknown engine kind {kind!r}; known: {', '.join(ENGINE_KINDS)}")
