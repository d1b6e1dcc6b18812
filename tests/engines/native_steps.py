"""Generating to the end through the native engine's StepLoop, and picking a token to poison, for the CPU
and GPU tests."""

from __future__ import annotations

from engines.native.block_manager import BlockManager
from engines.native.scheduler import Scheduler, SchedulerConfig
from engines.native.sequence import Sequence
from engines.native.step_loop import StepLoop


def run_to_the_end(runner, prompts, params, run_ahead: bool, abort: tuple[str, int] | None = None):
    """{seq id: (generated ids, finish reason)} and the StepLoop; `abort` = (seq id, after that
    many of its tokens)."""
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8), BlockManager(runner.num_blocks, runner.config.block_size))
    loop = StepLoop(scheduler, runner, frozenset({2}), run_ahead)
    seqs = {f"s{i}": Sequence(f"s{i}", list(ids), sampling) for i, (ids, sampling) in enumerate(zip(prompts, params))}
    for seq in seqs.values():
        runner.sampler.forget(seq.seq_id)  # a seeded sequence starts from its seed, as in the engine
        scheduler.add(seq)
    outputs = {seq_id: ([], None) for seq_id in seqs}
    while not loop.is_idle:
        for seq, token, reason in loop.step():
            tokens, _ = outputs[seq.seq_id]
            tokens.append(token)
            outputs[seq.seq_id] = (tokens, reason)
            if abort and seq.seq_id == abort[0] and len(tokens) == abort[1]:
                scheduler.abort(seq.seq_id)
    assert scheduler.block_manager.num_free_blocks == runner.num_blocks  # nothing leaked
    return outputs, loop


def token_only_in(own: list[int], others: list[list[int]]) -> int:
    """The first token of `own` that none of `others` holds: a NaN in its embedding row reaches only
    the sequence that reads it."""
    seen = {token for ids in others for token in ids}
    return next(token for token in own if token not in seen)
