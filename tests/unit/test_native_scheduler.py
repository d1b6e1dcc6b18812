"""The native engine's block manager and scheduler, with a fake model (no torch)."""

from __future__ import annotations

import random

import pytest

from engines.base import SamplingParams
from engines.native.block_manager import BlockManager
from engines.native.scheduler import Scheduler, SchedulerConfig
from engines.native.sequence import Sequence, SequenceStatus

EOS = frozenset({0})


def seq(seq_id: str, prompt_len: int, max_tokens: int) -> Sequence:
    return Sequence(seq_id, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, temperature=0))


def test_blocks_are_allocated_for_the_prompt_and_freed():
    manager = BlockManager(num_blocks=10, block_size=4)
    s = seq("a", 9, 5)  # 9 tokens -> 3 blocks
    assert manager.can_allocate(s)
    manager.allocate(s)
    assert len(s.block_table) == 3 and manager.num_free_blocks == 7
    manager.free(s)
    assert s.block_table == [] and manager.num_free_blocks == 10


def test_a_new_block_only_when_the_last_one_is_full():
    manager = BlockManager(num_blocks=3, block_size=4)
    s = seq("a", 4, 5)
    manager.allocate(s)  # exactly one full block
    assert manager.can_append(s)
    manager.may_append(s)  # token 5 needs block 2
    assert len(s.block_table) == 2
    s.token_ids.append(99)
    manager.may_append(s)  # token 6 fits in block 2
    assert len(s.block_table) == 2


def test_room_for_a_step_ahead_is_one_token_past_the_running_step_or_nothing():
    scheduler = Scheduler(SchedulerConfig(), BlockManager(num_blocks=6, block_size=4))
    manager = scheduler.block_manager
    a, b = seq("a", 3, 8), seq("b", 7, 8)
    scheduler.add(a), scheduler.add(b)
    scheduler.schedule()  # prefill
    scheduler.postprocess([a, b], [5, 5], EOS)  # a: 4 tokens, b: 8
    scheduler.schedule()  # decode: room for the tokens it makes (5th, 9th) -> a 2 blocks, b 3, 1 free
    assert manager.num_free_blocks == 1
    for _ in range(4):  # steps ahead write a's 5th-8th and b's 9th-12th tokens: all inside their blocks
        assert scheduler.reserve_one_more([a, b]) and manager.num_free_blocks == 1
        scheduler.postprocess([a, b], [5, 5], EOS)
    assert [a.num_tokens, b.num_tokens] == [8, 12]
    assert not scheduler.reserve_one_more([a, b])  # each needs a block for its 9th / 13th; 1 is free
    assert [len(a.block_table), len(b.block_table), manager.num_free_blocks] == [2, 3, 1]  # nothing taken
    assert scheduler.reserve_one_more([a])
    assert [len(a.block_table), manager.num_free_blocks] == [3, 0]


def test_prefill_runs_before_decode_and_respects_the_token_budget():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), BlockManager(64, 4))
    for name in "abc":
        scheduler.add(seq(name, 4, 3))
    batch, is_prefill = scheduler.schedule()
    assert is_prefill and [s.seq_id for s in batch] == ["a", "b"]  # 4 + 4 tokens; "c" would make 12
    scheduler.postprocess(batch, [5, 5], EOS)
    batch, is_prefill = scheduler.schedule()
    assert is_prefill and [s.seq_id for s in batch] == ["c"]
    scheduler.postprocess(batch, [5], EOS)
    batch, is_prefill = scheduler.schedule()
    assert not is_prefill and len(batch) == 3


def test_max_num_seqs_bounds_the_running_set():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=2), BlockManager(64, 4))
    for name in "abc":
        scheduler.add(seq(name, 2, 3))
    batch, _ = scheduler.schedule()
    assert len(batch) == 2 and len(scheduler.waiting) == 1


def test_preemption_frees_blocks_and_requeues_the_newest_first():
    manager = BlockManager(num_blocks=4, block_size=2)
    scheduler = Scheduler(SchedulerConfig(), manager)
    first, second = seq("first", 2, 6), seq("second", 2, 6)
    scheduler.add(first)
    scheduler.add(second)
    batch, _ = scheduler.schedule()
    scheduler.postprocess(batch, [7, 7], EOS)  # both now hold 3 tokens in 2 of 4 blocks
    batch, is_prefill = scheduler.schedule()  # both need a new block: only 2 left, fine
    assert not is_prefill and len(batch) == 2
    scheduler.postprocess(batch, [7, 7], EOS)
    scheduler.postprocess(scheduler.schedule()[0], [7, 7], EOS)  # 5 tokens each: 3 blocks each needed
    batch, _ = scheduler.schedule()
    assert scheduler.num_preemptions >= 1
    assert second.status == SequenceStatus.WAITING and second.block_table == []
    assert scheduler.waiting[0] is second and batch == [first]


def test_stop_tokens_and_length_finish_and_free():
    manager = BlockManager(16, 4)
    scheduler = Scheduler(SchedulerConfig(), manager)
    a, b = seq("a", 3, 2), seq("b", 3, 5)
    scheduler.add(a)
    scheduler.add(b)
    batch, _ = scheduler.schedule()
    assert scheduler.postprocess(batch, [9, 0], EOS) == [None, "stop"]
    batch, _ = scheduler.schedule()
    assert scheduler.postprocess(batch, [9], EOS) == ["length"]
    assert scheduler.is_idle and manager.num_free_blocks == 16


def test_a_request_larger_than_the_cache_is_refused():
    scheduler = Scheduler(SchedulerConfig(), BlockManager(4, 4))
    with pytest.raises(ValueError, match="KV cache"):
        scheduler.add(seq("huge", 10, 10))


def test_no_block_leaks_after_a_thousand_random_requests():
    rng = random.Random(1234)
    manager = BlockManager(num_blocks=40, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=12, max_num_batched_tokens=64), manager)
    submitted, finished, aborted = 0, {}, set()
    while submitted < 1000 or not scheduler.is_idle:
        for _ in range(rng.randint(0, 3)):
            if submitted < 1000:
                scheduler.add(seq(f"r{submitted}", rng.randint(1, 30), rng.randint(1, 40)))
                submitted += 1
        if rng.random() < 0.02 and scheduler.running:
            victim = rng.choice(scheduler.running)
            scheduler.abort(victim.seq_id)
            aborted.add(victim.seq_id)
        batch, _ = scheduler.schedule()
        if not batch:
            continue
        tokens = [0 if rng.random() < 0.02 else rng.randint(1, 100) for _ in batch]
        for s, reason in zip(batch, scheduler.postprocess(batch, tokens, EOS)):
            if reason:
                finished[s.seq_id] = (reason, s)
    assert len(finished) + len(aborted) == 1000
    assert manager.num_free_blocks == manager.num_blocks  # every block came back
    assert manager.num_cached_tokens > 0  # the prompts share prefixes (1, 2, 3, ...): blocks were shared
    assert not any(manager._ref_counts)
    for reason, s in finished.values():
        assert s.num_generated_tokens == s.sampling.max_tokens or reason == "stop"
    assert scheduler.num_preemptions > 0  # the cache was small enough to force some


def tokens_seq(seq_id: str, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, list(tokens), SamplingParams(max_tokens=4, temperature=0))


def computed(s: Sequence) -> Sequence:
    s.num_computed_tokens = s.num_tokens  # as after its prefill step
    return s


def test_a_shared_prefix_shares_full_blocks_and_counts_them_as_computed():
    manager = BlockManager(num_blocks=16, block_size=4)
    first = tokens_seq("a", list(range(10)))  # blocks [0..3] [4..7] [8, 9]
    manager.allocate(first)
    computed(first)
    second = tokens_seq("b", list(range(8)) + [99, 98, 97])
    manager.allocate(second)
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] not in first.block_table
    assert second.num_computed_tokens == 8 and manager.num_cached_tokens == 8
    assert manager.num_free_blocks == 16 - 3 - 1
    manager.free(second)
    assert manager.num_free_blocks == 16 - 3  # the shared blocks stay with the first sequence
    manager.free(first)
    assert manager.num_free_blocks == 16


def test_the_last_token_is_always_computed_even_when_the_whole_prompt_is_cached():
    manager = BlockManager(num_blocks=8, block_size=4)
    manager.allocate(computed(first := tokens_seq("a", list(range(8)))))
    again = tokens_seq("b", list(range(8)))
    manager.allocate(again)
    assert again.num_computed_tokens == 4  # block 2 is recomputed for its last token's logits
    assert again.block_table[0] == first.block_table[0] and again.block_table[1] != first.block_table[1]


def test_a_freed_prefix_is_found_again_until_its_blocks_are_reused():
    manager = BlockManager(num_blocks=6, block_size=4)
    manager.allocate(first := tokens_seq("a", list(range(9))))
    computed(first)
    manager.free(first)
    again = tokens_seq("b", list(range(9)))
    assert manager.can_allocate(again)
    manager.allocate(again)
    assert again.num_computed_tokens == 8 and manager.num_free_blocks == 3
    manager.free(again)
    other = tokens_seq("c", [50 + i for i in range(24)])  # takes every block: the cache is evicted
    manager.allocate(other)
    manager.free(other)
    late = tokens_seq("d", list(range(9)))
    manager.allocate(late)
    assert late.num_computed_tokens == 0


def test_blocks_of_a_sequence_that_was_never_computed_are_not_shared():
    manager = BlockManager(num_blocks=8, block_size=4)
    manager.allocate(failed := tokens_seq("a", list(range(9))))
    manager.free(failed)  # its step failed: num_computed_tokens never moved
    manager.allocate(retry := tokens_seq("b", list(range(9))))
    assert retry.num_computed_tokens == 0


def test_prefix_caching_can_be_turned_off():
    manager = BlockManager(num_blocks=8, block_size=4, prefix_caching=False)
    manager.allocate(computed(tokens_seq("a", list(range(9)))))
    manager.allocate(again := tokens_seq("b", list(range(9))))
    assert again.num_computed_tokens == 0 and manager.num_free_blocks == 2
