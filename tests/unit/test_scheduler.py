"""The scheduler with deterministic, fault-injecting fake engines."""

from __future__ import annotations

import asyncio

import pytest

from app.scheduler import AdmissionLimits, Scheduler
from app.scheduler_errors import (
    Draining,
    EngineFailed,
    ModelNotFound,
    NotReady,
    Overloaded,
    RequestTimedOut,
    ShutDown,
)
from engines.base import GenerationRequest, SamplingParams
from tests.fakes import FakeEngine, Faults

MODEL = "m"


def request(request_id: str, max_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(request_id, (1, 2, 3), SamplingParams(max_tokens=max_tokens, temperature=0.0))


def scheduler_with(*engines: FakeEngine, **limits) -> Scheduler:
    scheduler = Scheduler(AdmissionLimits(**limits))
    scheduler.expect_model(MODEL)
    for index, engine in enumerate(engines):
        engine.start()
        scheduler.add_engine(MODEL, f"fake-{index}", engine)
    return scheduler


async def drain_handle(handle) -> list[int]:
    tokens = []
    async for chunk in handle:
        tokens.extend(chunk.token_ids)
    return tokens


async def test_first_come_first_served_by_default():
    engine = FakeEngine(reply="ab", token_delay_s=0.01, max_concurrency=1)
    scheduler = scheduler_with(engine)
    handles = [scheduler.submit(request(f"r{i}"), MODEL) for i in range(4)]
    await asyncio.gather(*(drain_handle(h) for h in handles))
    assert engine.started == ["r0", "r1", "r2", "r3"]


async def test_lower_priority_value_runs_first():
    engine = FakeEngine(reply="ab", token_delay_s=0.01, max_concurrency=1)
    scheduler = scheduler_with(engine, priority_aging_s=1000)
    handles = [scheduler.submit(request("first"), MODEL, priority=0),
               scheduler.submit(request("low"), MODEL, priority=5),
               scheduler.submit(request("high"), MODEL, priority=-5),
               scheduler.submit(request("mid"), MODEL, priority=0)]
    await asyncio.gather(*(drain_handle(h) for h in handles))
    assert engine.started == ["first", "high", "mid", "low"]


async def test_waiting_requests_age_so_low_priority_is_not_starved():
    engine = FakeEngine(reply="abcdefgh", token_delay_s=0.01, max_concurrency=1)
    scheduler = scheduler_with(engine, priority_aging_s=0.02)
    first = scheduler.submit(request("first", max_tokens=8), MODEL)
    patient = scheduler.submit(request("patient"), MODEL, priority=3)
    await asyncio.sleep(0.1)  # "patient" has waited 5 aging periods: effective priority -2
    urgent = scheduler.submit(request("urgent"), MODEL, priority=0)
    await asyncio.gather(*(drain_handle(h) for h in (first, patient, urgent)))
    assert engine.started == ["first", "patient", "urgent"]


async def test_queue_bound_rejects_with_retry_after():
    engine = FakeEngine(reply="abcdefgh", token_delay_s=0.05, max_concurrency=2)
    scheduler = scheduler_with(engine, max_running=2, max_waiting=1)
    admitted = [scheduler.submit(request(f"r{i}", max_tokens=8), MODEL) for i in range(3)]
    with pytest.raises(Overloaded) as refused:
        scheduler.submit(request("r3"), MODEL)
    assert refused.value.retry_after_s >= 1
    assert scheduler.is_overloaded
    await asyncio.gather(*(drain_handle(h) for h in admitted))
    assert not scheduler.is_overloaded


async def test_retry_after_grows_with_the_work_left_in_running_requests():
    def overloaded_retry_after(max_tokens: int) -> float:
        scheduler = scheduler_with(FakeEngine(token_delay_s=10), max_running=1, max_waiting=0)
        scheduler.submit(request("running", max_tokens=max_tokens), MODEL)
        with pytest.raises(Overloaded) as refused:
            scheduler.submit(request("refused"), MODEL)
        return refused.value.retry_after_s

    # At the default 20 tokens/s per stream: 40 tokens left -> 2 s, 400 -> 20 s.
    assert overloaded_retry_after(40) == 2
    assert overloaded_retry_after(400) == 20


async def test_unknown_model_and_model_without_engine():
    scheduler = scheduler_with(FakeEngine())
    with pytest.raises(ModelNotFound):
        scheduler.submit(request("x"), "other")
    scheduler.expect_model("loading")
    with pytest.raises(NotReady):
        scheduler.submit(request("y"), "loading")
    scheduler.engine_failed_to_load("loading", "native-cuda-0", "ValueError: not serializable")
    with pytest.raises(NotReady, match="Failed to load: native-cuda-0: ValueError: not serializable"):
        scheduler.submit(request("z"), "loading")


async def test_deadline_aborts_a_running_request_in_the_engine():
    engine = FakeEngine(reply="abcdefgh", token_delay_s=0.1)
    scheduler = scheduler_with(engine)
    handle = scheduler.submit(request("slow", max_tokens=8), MODEL, timeout_s=0.15)
    with pytest.raises(RequestTimedOut) as timed_out:
        await drain_handle(handle)
    assert not timed_out.value.queued
    assert "slow" in engine.aborted and not engine.active


async def test_deadline_while_queued_never_reaches_the_engine():
    engine = FakeEngine(reply="abcdefgh", token_delay_s=0.05, max_concurrency=1)
    scheduler = scheduler_with(engine)
    busy = scheduler.submit(request("busy", max_tokens=8), MODEL)
    queued = scheduler.submit(request("queued"), MODEL, timeout_s=0.05)
    with pytest.raises(RequestTimedOut) as timed_out:
        await drain_handle(queued)
    assert timed_out.value.queued
    await drain_handle(busy)
    assert "queued" not in engine.started


async def test_stopping_a_handle_aborts_the_engine_and_frees_the_slot():
    engine = FakeEngine(reply="abcdefgh" * 10, token_delay_s=0.02, max_concurrency=1)
    scheduler = scheduler_with(engine)
    first = scheduler.submit(request("first", max_tokens=80), MODEL)
    second = scheduler.submit(request("second", max_tokens=2), MODEL)
    async for _ in first:
        first.stop("client_disconnect")
        break
    assert await asyncio.wait_for(drain_handle(second), timeout=1) == [ord("a"), ord("b")]
    assert "first" in engine.aborted
    assert scheduler.num_in_flight == 0


async def test_failure_before_first_token_moves_to_the_next_engine_invisibly():
    broken = FakeEngine(faults=Faults(fail_before_first_token=1))
    healthy = FakeEngine()
    scheduler = scheduler_with(broken, healthy, health_check_interval_s=0.05)
    tokens = await drain_handle(scheduler.submit(request("r", max_tokens=5), MODEL))
    assert bytes(tokens).decode() == "Hello"
    assert healthy.started == ["r"]


async def test_failure_after_output_is_an_error_naming_the_engine():
    engine = FakeEngine(faults=Faults(fail_after_tokens=3))
    other = FakeEngine()
    scheduler = scheduler_with(engine, other)
    handle = scheduler.submit(request("r", max_tokens=10), MODEL)
    # Route to the engine that fails: both are idle, so the first (least work) is chosen.
    received = []
    with pytest.raises(EngineFailed) as failed:
        async for chunk in handle:
            received.extend(chunk.token_ids)
    assert len(received) == 3
    assert failed.value.after_output and failed.value.engine_name == "fake-0"
    assert other.started == []  # no silent retry once the client has seen output


async def test_failed_engine_leaves_rotation_and_returns_when_healthy():
    flaky = FakeEngine(faults=Faults(fail_before_first_token=1, unhealthy=True))
    scheduler = scheduler_with(flaky, health_check_interval_s=0.02)
    with pytest.raises(EngineFailed):
        await drain_handle(scheduler.submit(request("r1"), MODEL))
    slot = scheduler.slots()[0]
    assert not slot.in_rotation
    with pytest.raises(NotReady):
        scheduler.submit(request("r2"), MODEL)
    await asyncio.sleep(0.1)
    assert not slot.in_rotation  # still reports unhealthy: not probed back
    flaky.faults.unhealthy = False
    for _ in range(50):
        if slot.in_rotation:
            break
        await asyncio.sleep(0.02)
    assert slot.in_rotation
    assert await drain_handle(scheduler.submit(request("r3", max_tokens=2), MODEL))


async def test_a_request_that_fails_alone_leaves_its_engine_in_rotation():
    """RequestFailed (the native engine's NaN logits): that request gets the error, the engine is
    healthy and takes the next request at once."""
    engine = FakeEngine(faults=Faults(fail_after_tokens=2, only_the_request=True))
    scheduler = scheduler_with(engine, health_check_interval_s=60)
    with pytest.raises(EngineFailed) as failed:
        await drain_handle(scheduler.submit(request("r1", max_tokens=5), MODEL))
    assert failed.value.after_output and scheduler.slots()[0].in_rotation
    engine.faults.fail_after_tokens = None
    assert bytes(await drain_handle(scheduler.submit(request("r2", max_tokens=5), MODEL))).decode() == "Hello"


async def test_requests_go_to_the_engine_with_least_outstanding_work():
    a, b = FakeEngine(token_delay_s=0.05), FakeEngine(token_delay_s=0.05)
    scheduler = scheduler_with(a, b)
    handles = [scheduler.submit(request(f"r{i}", max_tokens=5), MODEL) for i in range(6)]
    await asyncio.gather(*(drain_handle(h) for h in handles))
    assert len(a.started) == 3 and len(b.started) == 3


async def test_drain_lets_requests_finish_and_refuses_new_ones():
    engine = FakeEngine(reply="abcd", token_delay_s=0.02)
    scheduler = scheduler_with(engine)
    handle = scheduler.submit(request("r", max_tokens=4), MODEL)
    reading = asyncio.ensure_future(drain_handle(handle))
    aborted = await scheduler.drain(timeout_s=5)
    assert aborted == 0
    assert bytes(await reading).decode() == "abcd"
    with pytest.raises(Draining):
        scheduler.submit(request("late"), MODEL)


async def test_drain_timeout_aborts_what_is_left_with_an_error():
    engine = FakeEngine(reply="a" * 100, token_delay_s=0.05)
    scheduler = scheduler_with(engine)
    handle = scheduler.submit(request("long", max_tokens=100), MODEL)
    reading = asyncio.ensure_future(drain_handle(handle))
    assert await scheduler.drain(timeout_s=0.1) == 1
    with pytest.raises(ShutDown):
        await reading
    assert "long" in engine.aborted
