"""The source model as a Hugging Face checkpoint directory: GGUF files are converted once."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from engines.gguf_metadata import read_gguf_metadata


@dataclass(frozen=True)
class Source:
    path: Path
    format: str  # "gguf" or "checkpoint"
    sha256: str
    architecture: str


def describe_source(path: str | Path) -> Source:
    source = Path(path)
    if source.is_file() and source.suffix.lower() == ".gguf":
        architecture = read_gguf_metadata(source).get("general.architecture", "unknown")
        return Source(source, "gguf", _file_sha256(source), architecture)
    config = source / "config.json"
    if source.is_dir() and config.exists() and any(source.glob("*.safetensors")):
        architecture = json.loads(config.read_text()).get("model_type", "unknown")
        digest = hashlib.sha256()
        for file in sorted(source.glob("*.safetensors")) + [config]:
            digest.update(file.name.encode())
            digest.update(_file_sha256(file).encode())
        return Source(source, "checkpoint", digest.hexdigest(), architecture)
    raise ValueError(f"{source} is neither a .gguf file nor a Hugging Face checkpoint directory (safetensors)")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_checkpoint(source: Source, work_dir: Path) -> Path:
    """A float32 checkpoint directory for `source` (GGUF weights dequantized once, cached)."""
    if source.format == "checkpoint":
        return source.path
    target = work_dir / f"checkpoint-{source.sha256[:16]}"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM

    from engines.prepare.gguf_tokenizer import build_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(source.path.parent), gguf_file=source.path.name, dtype="float32")
    drop_gguf_quantizer(model)
    tokenizer = build_tokenizer(source.path)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def drop_gguf_quantizer(model) -> None:
    """Let a model loaded from a GGUF be saved as the plain float checkpoint it is.

    transformers dequantizes a GGUF's tensors as it loads them, but later versions (5.17, not
    5.5) also attach a GGUF quantizer that save_pretrained refuses to serialize ("quantized
    with QuantizationMethod.GGUF and is not serializable"). The weights are floats either way,
    so the marker goes, and with it the quantization config a reload would act on."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    not_float = sorted({str(p.dtype) for p in model.parameters() if not p.dtype.is_floating_point})
    if not_float:
        raise ValueError(f"the GGUF loaded with {', '.join(not_float)} weights; lowbit needs them dequantized")
    model.hf_quantizer = None
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
