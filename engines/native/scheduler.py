"""Decides what the native engine runs each step: a prefill batch or a decode batch. No torch.

Prefill first: waiting sequences are admitted in arrival order while they fit the token
budget, `max_num_seqs` and the free KV blocks. Otherwise every running sequence decodes one
token; when KV blocks run out, the most recently admitted sequence is preempted: its blocks
are freed and it goes back to the front of the waiting queue, to be recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engines.native.block_manager import BlockManager
from engines.native.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def is_idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        max_tokens = self.block_manager.num_blocks * self.block_manager.block_size
        if seq.num_tokens + seq.sampling.max_tokens > max_tokens:
            raise ValueError(f"sequence needs {seq.num_tokens + seq.sampling.max_tokens} tokens of KV cache; "
                             f"the cache holds {max_tokens}")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, seq_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in list(queue):
                if seq.seq_id == seq_id:
                    queue.remove(seq)
                    self._finish(seq)
                    return seq
        return None

    def schedule(self) -> tuple[list[Sequence], bool]:
        """(sequences to run, whether this is a prefill step)."""
        scheduled: list[Sequence] = []
        budget = self.config.max_num_batched_tokens
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_tokens > budget and scheduled:
                break
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(seq)
            budget -= seq.num_tokens
        if scheduled:
            return scheduled, True
        for seq in list(self.running):
            if seq not in self.running:  # preempted while making room for an earlier one
                continue
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.may_append(seq)
                scheduled.append(seq)
        return scheduled, False

    def reserve_one_more(self, seqs: list[Sequence]) -> bool:
        """Room in every sequence's blocks for a token past the one its running step makes (a
        step launched before that token is known: StepLoop); False, and nothing taken, when
        the free blocks do not cover it."""
        manager = self.block_manager
        short = [seq for seq in seqs if manager.needs_block(seq)]  # position num_tokens has no slot yet
        if len(short) > manager.num_free_blocks:
            return False
        for seq in short:
            manager.append_block(seq)
        return True

    def postprocess(self, seqs: list[Sequence], next_tokens: list[int], eos_token_ids: frozenset[int]) -> list[str | None]:
        """Append each sequence's new token; return its finish reason ("stop", "length") or None."""
        reasons: list[str | None] = []
        for seq, token in zip(seqs, next_tokens):
            seq.num_computed_tokens = seq.num_tokens
            seq.token_ids.append(token)
            reason = None
            if token in eos_token_ids or token in seq.sampling.stop_token_ids:
                reason = "stop"
            elif seq.num_generated_tokens >= seq.sampling.max_tokens:
                reason = "length"
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq)
            reasons.append(reason)
        return reasons

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)  # recomputed (prompt + output so far) before newer work
        self.num_preemptions += 1

    def _finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)
