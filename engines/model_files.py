"""Facts about a model on disk (a GGUF file or a model directory), read without loading it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engines.gguf_metadata import context_length, quantization_name, read_gguf_metadata

_DEFAULT_CONTEXT_LENGTH = 2048  # used only when a model states none


@dataclass(frozen=True)
class ModelDescription:
    path: str
    format: str  # "gguf" or "directory"
    name: str  # a readable default model id
    context_length: int
    quantization: str


def describe_model(path: str | Path) -> ModelDescription:
    """Describe a GGUF file or a Hugging Face / OpenVINO model directory.

    Raises FileNotFoundError or ValueError with a message fit for a user.
    """
    model_path = Path(path)
    if not model_path.exists():
        raise FileNotFoundError(f"model not found: {model_path}")
    if model_path.is_file():
        if model_path.suffix.lower() != ".gguf":
            raise ValueError(f"{model_path} is neither a .gguf file nor a model directory")
        metadata = read_gguf_metadata(model_path)
        return ModelDescription(
            path=str(model_path),
            format="gguf",
            name=model_path.name.removesuffix(".gguf"),
            context_length=context_length(metadata) or _DEFAULT_CONTEXT_LENGTH,
            quantization=quantization_name(metadata),
        )
    config_file = model_path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    manifest = read_manifest(model_path)
    scheme = manifest.get("quantization", {})
    quantization = scheme.get("name") or ("openvino-ir" if any(model_path.glob("*.xml")) else "unknown")
    return ModelDescription(
        path=str(model_path),
        format="directory",
        # An artifact is named after its model and target, so that several artifacts of one
        # model can be served side by side and told apart.
        name=f"{manifest['model_id']}-{manifest['target']}" if manifest.get("model_id") else model_path.name,
        context_length=int(config.get("max_position_embeddings") or _DEFAULT_CONTEXT_LENGTH),
        quantization=quantization,
    )


def read_manifest(path: str | Path) -> dict:
    """The `lowbit.json` that `lowbit prepare` writes into an artifact directory, or {}."""
    manifest_file = Path(path) / "lowbit.json"
    return json.loads(manifest_file.read_text()) if Path(path).is_dir() and manifest_file.exists() else {}
