"""API tests: the real app (routes, scheduler, metrics) over ASGI, with the fake engine."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from app.server import create_app
from app.settings import Settings
from tests.fakes import FakeEngine

MODEL = "fake-model"


def make_client(engine: FakeEngine, **settings) -> TestClient:
    settings.setdefault("model_id", MODEL)
    app = create_app(Settings(**settings), engine_builder=lambda spec, path: engine)
    return TestClient(app)


def wait_ready(client: TestClient, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/health/ready").status_code == 200:
            return
        time.sleep(0.01)
    raise AssertionError("the app did not become ready")


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine):
    with make_client(engine) as test_client:
        wait_ready(test_client)
        yield test_client
