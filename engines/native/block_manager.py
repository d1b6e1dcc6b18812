"""Fixed-size KV-cache blocks: a free list and each sequence's block table. No torch here."""

from __future__ import annotations

from collections import deque

from engines.native.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def can_allocate(self, seq: Sequence) -> bool:
        """Room for every token the sequence has now (its prompt, or prompt + output)."""
        return seq.num_blocks_needed(self.block_size) - len(seq.block_table) <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        missing = seq.num_blocks_needed(self.block_size) - len(seq.block_table)
        if missing > len(self._free):
            raise RuntimeError("not enough free KV blocks; call can_allocate first")
        seq.block_table.extend(self._free.popleft() for _ in range(missing))

    def can_append(self, seq: Sequence) -> bool:
        """Room for one more token (a new block only when the last one is full)."""
        needs_block = seq.num_tokens >= len(seq.block_table) * self.block_size
        return not needs_block or bool(self._free)

    def may_append(self, seq: Sequence) -> None:
        """Give the sequence a new block if its next token would not fit."""
        if seq.num_tokens >= len(seq.block_table) * self.block_size:
            if not self._free:
                raise RuntimeError("no free KV block; call can_append first")
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
