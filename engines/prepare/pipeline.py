"""Prepare one source for several targets: convert, quantize, evaluate, gate, publish.

Artifacts are content-addressed: the directory name carries a hash of the source file,
the target, its scheme, the evaluation text and this code's version, so a repeated
`prepare` reuses a finished artifact. Each one is built in a temporary directory and
renamed into place only after it passed the gate and its manifest was written, so an
interrupted or refused run never leaves a directory that `serve` would load.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from engines.prepare.checkpoint import Source, describe_source, to_checkpoint
from engines.prepare.evaluation import evaluation_text, evaluation_text_sha256, perplexity_checkpoint
from engines.prepare.targets import Target, get_target

PREPARE_VERSION = 1  # bump when an artifact's content would change for the same inputs
MANIFEST = "lowbit.json"
_TOOLS = ("lowbit", "torch", "transformers", "optimum-intel", "nncf", "openvino", "openvino-tokenizers")

Progress = Callable[[str], None]


class AccuracyGateFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class PreparedArtifact:
    target: str
    path: Path
    reused: bool
    manifest: dict


def artifact_key(source: Source, target: Target) -> str:
    material = json.dumps({"source": source.sha256, "target": target.name, "scheme": target.scheme.as_dict(),
                           "evaluation": evaluation_text_sha256(), "version": PREPARE_VERSION}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def prepare(source_path: str | Path, target_names: Iterable[str], out_dir: str | Path,
            progress: Progress = print, corrupt: Callable[[Path], None] | None = None,
            work_dir: str | Path | None = None) -> list[PreparedArtifact]:
    """Build (or reuse) one artifact per target.

    `work_dir` holds the converted checkpoint (default: OUT/.work); `corrupt` is a test hook
    that damages an artifact before it is evaluated.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = [get_target(name) for name in target_names]  # unknown names fail before any work
    source = describe_source(source_path)
    results, pending = [], []
    for target in targets:
        final = out / f"{target.name}-{artifact_key(source, target)}"
        if (final / MANIFEST).exists():
            progress(f"{target.name}: reusing {final}")
            results.append(PreparedArtifact(target.name, final, True, json.loads((final / MANIFEST).read_text())))
            _point_latest(out, target.name, final)
        else:
            pending.append((target, final))
    if not pending:
        return results

    work = Path(work_dir) if work_dir is not None else out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = _step(progress, "source to checkpoint", lambda: to_checkpoint(source, work))
    token_ids = _evaluation_ids(checkpoint)
    reference = _step(progress, f"reference perplexity ({len(token_ids)} tokens)",
                      lambda: perplexity_checkpoint(checkpoint, token_ids))
    progress(f"reference perplexity: {reference:.3f}")
    for target, final in pending:
        staging = out / f".staging-{final.name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            _step(progress, f"{target.name}: build {target.scheme.name}",
                  lambda: target.build(checkpoint, staging, target.scheme))
            if corrupt is not None:
                corrupt(staging)
            perplexity = _step(progress, f"{target.name}: evaluate", lambda: target.evaluate(staging, token_ids))
            ratio = perplexity / reference
            verdict = "pass" if ratio <= target.max_perplexity_ratio else "fail"
            progress(f"{target.name}: perplexity {perplexity:.3f} vs reference {reference:.3f} = "
                     f"{ratio:.3f}x (limit {target.max_perplexity_ratio:.2f}x): {verdict}")
            if verdict == "fail":
                raise AccuracyGateFailed(
                    f"{target.name}: perplexity {perplexity:.3f} is {ratio:.3f}x the reference {reference:.3f}, "
                    f"above the limit of {target.max_perplexity_ratio:.2f}x; the artifact was not kept")
            manifest = _manifest(source, target, staging, reference, perplexity, ratio, len(token_ids))
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            staging.rename(final)  # atomic on one filesystem: serve sees all of it or nothing
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        results.append(PreparedArtifact(target.name, final, False, manifest))
        _point_latest(out, target.name, final)
    return results


def _point_latest(out: Path, target: str, artifact: Path) -> None:
    """OUT/<target>.latest holds the path of the newest artifact for that target (for scripts)."""
    pointer = out / f"{target}.latest"
    partial = pointer.with_name(pointer.name + ".partial")
    partial.write_text(str(artifact.resolve()) + "\n")
    partial.replace(pointer)


def _step(progress: Progress, name: str, work):
    progress(f"{name} ...")
    started = time.perf_counter()
    result = work()
    progress(f"{name}: done in {time.perf_counter() - started:.1f} s")
    return result


def _evaluation_ids(checkpoint: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    return tokenizer(evaluation_text(), add_special_tokens=False).input_ids


def _manifest(source: Source, target: Target, artifact: Path, reference: float, perplexity: float,
              ratio: float, num_tokens: int) -> dict:
    size = sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file())
    return {
        "format_version": PREPARE_VERSION,
        "model_id": source.path.name.removesuffix(".gguf"),
        "source": {"path": str(source.path), "format": source.format, "sha256": source.sha256},
        "architecture": source.architecture,
        "target": target.name,
        "engine": target.engine,
        "device": target.device,
        "quantization": target.scheme.as_dict(),
        "calibration": None,  # data-free; calibration-aware schemes come with their own targets
        # Evaluation runs on this machine's CPU. For another device the format is checked
        # (and it compiles and runs on the CPU), but it was not run on that device.
        "evaluated_on": "CPU",
        "run_on_target_device": target.device == "CPU",
        "evaluation": {
            "text_sha256": evaluation_text_sha256(), "tokens": num_tokens,
            "reference_perplexity": round(reference, 4), "perplexity": round(perplexity, 4),
            "ratio": round(ratio, 4), "max_ratio": target.max_perplexity_ratio, "passed": True,
        },
        "size_bytes": size,
        "tools": {name: _version(name) for name in _TOOLS} | {"python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
