"""The native engine on the real default model, on the CPU (reference attention path)."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager

import pytest

pytest.importorskip("transformers", reason="needs `make install-prepare` (torch, transformers)")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from app.default_model import default_model_path  # noqa: E402
from engines.base import GenerationRequest, RequestFailed, SamplingParams  # noqa: E402
from engines.native.engine import NativeEngine, NativeOptions  # noqa: E402
from tests.engines.native_steps import run_to_the_end, token_only_in  # noqa: E402

PROMPTS = [
    [{"role": "user", "content": "Write a short story about a fox who finds a key."}],
    [{"role": "system", "content": "You answer in detail."}, {"role": "user", "content": "Explain how tides work."}],
    [{"role": "user", "content": "List some good habits for learning a new language, with reasons."}],
]


@pytest.fixture(scope="module")
def checkpoint(artifacts_dir):
    from engines.prepare.checkpoint import describe_source, to_checkpoint

    work = artifacts_dir / ".work"
    work.mkdir(exist_ok=True)
    return to_checkpoint(describe_source(default_model_path()), work)


@pytest.fixture(scope="module")
def engine(checkpoint):
    # run_ahead (on by default on CUDA only): the greedy tests below then go through step_loop's
    # steps launched ahead, the sampling test through the step-by-step path.
    engine = NativeEngine(checkpoint, NativeOptions(device="cpu", kv_cache_tokens=8192, block_size=16,
                                                    run_ahead=True))
    engine.start()
    yield engine
    engine.stop()


def prompt_ids(engine, messages) -> list[int]:
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages))


async def generate(engine, request_id: str, ids: list[int], max_tokens: int, **sampling) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **sampling})
    tokens = []
    async for chunk in engine.generate(GenerationRequest(request_id, tuple(ids), params)):
        tokens.extend(chunk.token_ids)
    return tokens


def test_greedy_output_equals_transformers_alone_and_batched(engine, checkpoint):
    reference = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    prompts = [prompt_ids(engine, messages) for messages in PROMPTS]
    expected = []
    with torch.no_grad():
        for ids in prompts:
            output = reference.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
            expected.append(output[0, len(ids):].tolist())
    assert all(len(tokens) >= 32 for tokens in expected)  # long enough to mean something

    alone = [asyncio.run(generate(engine, f"alone-{i}", ids, 40)) for i, ids in enumerate(prompts)]

    async def batched():
        return await asyncio.gather(*(generate(engine, f"batch-{i}", ids, 40) for i, ids in enumerate(prompts)))

    assert alone == expected
    assert asyncio.run(batched()) == expected  # prompts of different lengths in one batch


def test_seeded_sampling_is_reproducible_inside_a_batch(engine):
    ids = prompt_ids(engine, PROMPTS[0])
    sampling = {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 42}
    alone = asyncio.run(generate(engine, "seed-alone", ids, 16, **sampling))

    async def with_others():
        others = [generate(engine, f"other-{i}", prompt_ids(engine, PROMPTS[i]), 16, temperature=1.0)
                  for i in (1, 2)]
        return (await asyncio.gather(generate(engine, "seed-batch", ids, 16, **sampling), *others))[0]

    assert asyncio.run(with_others()) == alone


def test_kv_blocks_are_all_free_when_idle(engine):
    asyncio.run(generate(engine, "blocks", prompt_ids(engine, PROMPTS[0]), 8))
    assert engine.kv_cache_usage() == 0.0


def test_a_repeated_prompt_reuses_its_cached_prefix_and_answers_the_same(engine):
    ids = prompt_ids(engine, PROMPTS[1])
    manager = engine._scheduler.block_manager
    first = asyncio.run(generate(engine, "prefix-1", ids, 24))
    before = manager.num_cached_tokens
    second = asyncio.run(generate(engine, "prefix-2", ids, 24))
    assert second == first
    assert manager.num_cached_tokens - before == (len(ids) - 1) // 16 * 16  # every full block but the last token's


# --- step_loop: decode steps launched ahead against step by step, on the runner directly -------

@pytest.fixture(scope="module")
def runner(checkpoint):
    from engines.native.model_runner import ModelRunner, RunnerConfig

    return ModelRunner(RunnerConfig(device="cpu", kv_cache_tokens=4096, block_size=16), checkpoint)


def test_decode_steps_launched_ahead_give_the_tokens_of_step_by_step(engine, runner):
    prompts = [prompt_ids(engine, messages) for messages in PROMPTS]
    # Lengths that end inside and at the edge of a 16-token block, and a third sequence that
    # stops on a token of its own output (found step by step first).
    greedy = [SamplingParams(max_tokens=n, temperature=0.0) for n in (13, 16, 30)]
    expected, _ = run_to_the_end(runner, prompts, greedy, run_ahead=False)
    stop_token = expected["s2"][0][9]
    greedy[2] = SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=(stop_token,))
    expected, step_by_step = run_to_the_end(runner, prompts, greedy, run_ahead=False)
    assert expected["s2"][1] == "stop" and len(expected["s2"][0]) <= 10
    assert [expected[s][1] for s in ("s0", "s1")] == ["length", "length"]

    ahead, loop = run_to_the_end(runner, prompts, greedy, run_ahead=True)
    assert ahead == expected
    assert step_by_step.steps_ahead == 0 and loop.steps_ahead >= 10


def test_a_sequence_aborted_while_a_step_runs_ahead_gets_no_more_tokens(engine, runner):
    prompts = [prompt_ids(engine, messages) for messages in PROMPTS[:2]]
    greedy = [SamplingParams(max_tokens=20, temperature=0.0)] * 2
    expected, _ = run_to_the_end(runner, prompts, greedy, run_ahead=False)
    ahead, loop = run_to_the_end(runner, prompts, greedy, run_ahead=True, abort=("s0", 5))
    assert ahead["s0"] == (expected["s0"][0][:5], None)  # the step in flight for it was thrown away
    assert ahead["s1"] == expected["s1"]
    assert loop.steps_ahead > 0


def test_sampled_batches_run_step_by_step(engine, runner):
    prompts = [prompt_ids(engine, PROMPTS[0])]
    _, loop = run_to_the_end(runner, prompts, [SamplingParams(max_tokens=8, temperature=0.8, seed=1)], run_ahead=True)
    assert loop.steps_ahead == 0  # the host draws those tokens, so there is nothing to feed ahead


# --- a NaN in the logits fails that request, not the batch ----------------------------------------

@contextmanager
def nan_embedding(model, token: int):
    """The embedding row of `token` set to NaN, in a copy of the table (SmolLM2's LM head shares
    it): a sequence that reads the token gets NaN logits from then on."""
    original = model.embed_tokens.weight
    poisoned = original.detach().clone()
    poisoned[token] = float("nan")
    model.embed_tokens.weight = torch.nn.Parameter(poisoned, requires_grad=False)
    try:
        yield
    finally:
        model.embed_tokens.weight = original


@pytest.mark.parametrize("run_ahead", [False, True])
def test_a_sequence_whose_decode_step_gives_nan_logits_is_failed_and_its_batch_goes_on(engine, runner, run_ahead):
    from engines.native.sequence import NAN_LOGITS
    from engines.native.step_loop import NAN_FAILURE

    prompts = [prompt_ids(engine, messages) for messages in PROMPTS]
    greedy = [SamplingParams(max_tokens=16, temperature=0.0)] * 3
    expected, _ = run_to_the_end(runner, prompts, greedy, run_ahead=False)
    # A token s1 generates that nothing else reads: its NaN row breaks s1's next decode step only.
    others = prompts + [expected["s0"][0], expected["s2"][0], expected["s1"][0][:4]]
    poisoned = token_only_in(expected["s1"][0][4:], others)
    cut = expected["s1"][0].index(poisoned) + 1
    with nan_embedding(runner.model, poisoned):
        outputs, loop = run_to_the_end(runner, prompts, greedy, run_ahead=run_ahead)
    assert outputs["s1"] == (expected["s1"][0][:cut] + [NAN_LOGITS], NAN_FAILURE)
    assert outputs["s0"] == expected["s0"] and outputs["s2"] == expected["s2"]
    assert (loop.steps_ahead > 0) == run_ahead  # and run_to_the_end found every KV block free


def test_a_sampled_sequence_with_nan_logits_is_failed_alone(engine, runner):
    """torch.multinomial raises on NaN probabilities: that used to fail the whole batch's requests."""
    from engines.native.sequence import NAN_LOGITS
    from engines.native.step_loop import NAN_FAILURE

    prompts = [prompt_ids(engine, messages) for messages in PROMPTS]
    sampled = [SamplingParams(max_tokens=8, temperature=0.8, seed=seed) for seed in (1, 2, 3)]
    expected, _ = run_to_the_end(runner, prompts, sampled, run_ahead=False)
    with nan_embedding(runner.model, token_only_in(prompts[2], prompts[:2])):  # s2's prefill breaks
        outputs, _ = run_to_the_end(runner, prompts, sampled, run_ahead=False)
    assert outputs["s2"] == ([NAN_LOGITS], NAN_FAILURE)
    assert outputs["s0"] == expected["s0"] and outputs["s1"] == expected["s1"]


def test_the_engine_fails_a_request_with_nan_logits_and_answers_the_next(engine):
    # A prompt no other test sends: none of its blocks is in the prefix cache, so its prefill reads the NaN row.
    ids = [prompt_ids(engine, PROMPTS[0]), prompt_ids(engine, [{"role": "user", "content": "Name three rivers."}])]
    clean = asyncio.run(generate(engine, "nan-clean", ids[0], 8))

    async def both():
        return await asyncio.gather(generate(engine, "nan-broken", ids[1], 8), generate(engine, "nan-other", ids[0], 8),
                                    return_exceptions=True)

    with nan_embedding(engine._runner.model, token_only_in(ids[1], ids[:1])):
        broken, other = asyncio.run(both())
    assert isinstance(broken, RequestFailed) and "NaN" in str(broken)
    assert other == clean
    assert asyncio.run(generate(engine, "nan-after", ids[1], 8))  # the engine goes on serving
    assert engine.kv_cache_usage() == 0.0
