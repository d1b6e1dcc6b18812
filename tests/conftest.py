"""Fixtures shared across test modules: artifacts are prepared once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def prepared(artifacts_dir):
    """prepared(target) -> PreparedArtifact, built on first use (content-addressed, so once)."""
    pytest.importorskip("optimum.intel", reason="conversion tools not installed (make install-prepare)")
    from app.default_model import default_model_path
    from engines.prepare.pipeline import prepare

    def get(target: str):
        (artifact,) = prepare(default_model_path(), [target], artifacts_dir, progress=lambda _: None)
        return artifact

    return get
