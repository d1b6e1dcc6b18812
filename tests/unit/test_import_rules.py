"""The layering rules of docs/ARCHITECTURE.md, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY_RUNTIMES = {"openvino", "openvino_genai", "onnxruntime", "onnxruntime_genai", "torch", "triton",
                  "tensorrt_llm", "transformers"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def roots(modules: set[str]) -> set[str]:
    return {module.split(".")[0] for module in modules}


def test_engines_never_import_app_fastapi_or_pydantic():
    for path in (ROOT / "engines").rglob("*.py"):
        assert not roots(imported_modules(path)) & {"app", "fastapi", "starlette", "pydantic"}, path


def test_scheduler_imports_nothing_from_fastapi():
    for name in ("scheduler.py", "scheduler_errors.py"):
        assert not roots(imported_modules(ROOT / "app" / name)) & {"fastapi", "starlette"}


# Modules private to one engine, imported only once that engine is chosen and started.
NATIVE_PRIVATE = ("model", "model_runner", "sampler", "kernels", "carveout", "attention_kernels", "int4_kernels",
                  "int4_skinny", "int4_wgmma", "linear", "quantization")
ENGINE_PRIVATE = {ROOT / "engines" / "native" / f"{name}.py" for name in NATIVE_PRIVATE}


def test_heavy_runtimes_are_imported_inside_engine_modules_only():
    for path in list((ROOT / "app").rglob("*.py")) + list((ROOT / "engines").rglob("*.py")):
        if path not in ENGINE_PRIVATE:
            assert not roots(top_level_imports(path)) & HEAVY_RUNTIMES, path


def test_engine_private_modules_are_imported_lazily():
    private = {f"engines.native.{name}" for name in NATIVE_PRIVATE}
    for path in list((ROOT / "app").rglob("*.py")) + list((ROOT / "engines").rglob("*.py")):
        if path not in ENGINE_PRIVATE:
            assert not top_level_imports(path) & private, path
    for path in (ROOT / "app").rglob("*.py"):
        assert not roots(imported_modules(path)) & HEAVY_RUNTIMES, path


def test_prometheus_objects_live_in_the_metrics_module_only():
    for path in (ROOT / "app").rglob("*.py"):
        if path.name != "metrics.py":
            source = path.read_text()
            for constructor in ("Counter(", "Histogram(", "Gauge("):
                assert constructor not in source, (path, constructor)


def test_native_scheduler_and_block_manager_import_no_torch():
    for name in ("scheduler.py", "block_manager.py", "sequence.py"):
        assert "torch" not in roots(imported_modules(ROOT / "engines" / "native" / name)), name
