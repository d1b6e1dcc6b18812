"""The metrics module: observer hooks, moving token rate, label bookkeeping."""

from __future__ import annotations

import inspect

from prometheus_client import generate_latest

from app.metrics import Metrics, TokenRateWindow
from app.scheduler import EngineSlot, SchedulerObserver
from engines.base import DeviceAttempt, EngineInfo
from tests.fakes import FakeEngine
from tests.prom import total


def slot(name: str = "fake-0") -> EngineSlot:
    return EngineSlot(name, "m", FakeEngine(), max_running=2, max_waiting=2)


def test_metrics_implements_every_scheduler_observer_hook():
    metrics = Metrics()
    a, b = slot("a"), slot("b")
    hooks = [name for name, _ in inspect.getmembers(SchedulerObserver, inspect.isfunction) if not name.startswith("_")]
    calls = {
        "request_rejected": ("m", "queue_full"),
        "request_admitted": (a,),
        "queue_changed": (a,),
        "request_started": (a, 0.25),
        "engine_fallback": (a, b),
        "request_aborted": (a, "timeout"),
        "rotation_changed": (a,),
    }
    assert set(hooks) == set(calls)
    for hook, arguments in calls.items():
        getattr(metrics, hook)(*arguments)
    text = generate_latest(metrics.registry).decode()
    assert total(text, "lowbit_engine_fallback_total", from_engine="a", to_engine="b") == 1
    assert total(text, "lowbit_request_rejected_total", reason="queue_full") == 1
    assert total(text, "lowbit_request_aborted_total", reason="timeout") == 1
    assert total(text, "lowbit_request_queue_time_seconds_count") == 1
    assert total(text, "lowbit_request_admitted_total") == 1


def test_device_fallback_is_counted_from_the_load_attempts():
    metrics = Metrics()
    info = EngineInfo("openvino", "CPU", "x.gguf", 8192, "gguf-q4_1", 16,
                      (DeviceAttempt("NPU", "no NPU"), DeviceAttempt("CPU")))
    metrics.engine_loaded("m", info, lambda: 0.25)
    text = generate_latest(metrics.registry).decode()
    assert total(text, "lowbit_device_fallback_total", from_device="NPU", to_device="CPU") == 1
    assert total(text, "lowbit_engine_info", quantization="gguf-q4_1", device="CPU") == 1
    assert total(text, "lowbit_kv_cache_usage_ratio", device="CPU") == 0.25


def test_token_rate_is_a_moving_window():
    now = [100.0]
    window = TokenRateWindow(window_s=10, clock=lambda: now[0])
    window.add(("m", "e", "d"), 50)
    now[0] += 5
    window.add(("m", "e", "d"), 50)
    assert window.rates()[("m", "e", "d")] == 10.0
    now[0] += 6  # the first 50 tokens are older than 10 s now
    assert window.rates()[("m", "e", "d")] == 5.0


def test_running_and_waiting_sum_over_instances_with_the_same_labels():
    metrics = Metrics()
    a, b = slot("a"), slot("b")
    a.running.add(object())
    b.running.add(object())
    b.waiting.append(object())
    metrics.queue_changed(a)
    metrics.queue_changed(b)
    text = generate_latest(metrics.registry).decode()
    assert total(text, "lowbit_num_requests_running") == 2
    assert total(text, "lowbit_num_requests_waiting") == 1
