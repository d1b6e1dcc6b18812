"""Fixed-size KV-cache blocks: a free list, each sequence's block table, and prefix caching. No torch.

Prefix caching: a full block of a sequence's tokens is known by a hash of its tokens chained
with the hash of the block before it, so equal hashes mean equal prefixes. When a sequence is
allocated, its leading full blocks that are already in the cache are shared (reference
counted) instead of computed again. A freed block keeps its content and hash while it waits
in the free list (least recently freed is reused first), so a later request with the same
prefix (a system prompt, an earlier turn of a chat) finds it until the block is taken for
something else.
"""

from __future__ import annotations

from collections import OrderedDict

from engines.native.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self._ref_counts = [0] * num_blocks
        self._block_hash: dict[int, int] = {}  # block -> hash of the full prefix it ends
        self._block_tokens: dict[int, tuple[int, ...]] = {}  # block -> its tokens (guards against collisions)
        self._cached: dict[int, int] = {}  # hash -> block
        self.num_cached_tokens = 0  # prompt tokens served from the cache since start (a counter)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def _prefix_hashes(self, seq: Sequence) -> list[tuple[int, tuple[int, ...]]]:
        """(chained hash, tokens) of each full block a sequence may share, leaving its last token
        to be computed (the step needs that token's logits)."""
        if not self.prefix_caching:
            return []
        result, previous = [], -1
        for index in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[index * self.block_size:(index + 1) * self.block_size])
            previous = hash((previous, tokens))
            result.append((previous, tokens))
        return result

    def _cache_hits(self, hashes: list[tuple[int, tuple[int, ...]]]) -> list[int]:
        """The blocks holding the longest cached prefix of these (hash, tokens) blocks, in order."""
        hits = []
        for prefix_hash, tokens in hashes:
            block = self._cached.get(prefix_hash)
            if block is None or self._block_tokens.get(block) != tokens:
                break
            hits.append(block)
        return hits

    def _has_room(self, seq: Sequence, hits: list[int]) -> bool:
        revived = sum(1 for block in hits if self._ref_counts[block] == 0)  # cached but in the free list
        return seq.num_blocks_needed(self.block_size) - len(hits) + revived <= len(self._free)

    def can_allocate(self, seq: Sequence) -> bool:
        """Room for every token the sequence has now (its prompt, or prompt + output)."""
        return self._has_room(seq, self._cache_hits(self._prefix_hashes(seq)))

    def allocate(self, seq: Sequence) -> None:
        """Give a sequence with no blocks its block table; shared prefix blocks count as computed."""
        if seq.block_table:
            raise RuntimeError("the sequence already has blocks")
        hashes = self._prefix_hashes(seq)  # hashed once: every check below reuses them
        hits = self._cache_hits(hashes)
        if not self._has_room(seq, hits):
            raise RuntimeError("not enough free KV blocks; call can_allocate first")
        for block in hits:
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1
        seq.block_table = list(hits)
        while len(seq.block_table) < seq.num_blocks_needed(self.block_size):
            block = self._take_free_block()
            index = len(seq.block_table)
            if index < len(hashes):  # a full block: others may share it once this step computed it
                self._remember(block, *hashes[index])
            seq.block_table.append(block)
        seq.num_computed_tokens = len(hits) * self.block_size
        self.num_cached_tokens += seq.num_computed_tokens

    def needs_block(self, seq: Sequence) -> bool:
        """Whether one more token (position `num_tokens`) falls past the sequence's blocks."""
        return seq.num_tokens >= len(seq.block_table) * self.block_size

    def can_append(self, seq: Sequence) -> bool:
        """Room for one more token (a new block only when the last one is full)."""
        return not self.needs_block(seq) or bool(self._free)

    def may_append(self, seq: Sequence) -> None:
        """Give the sequence a new block if its next token would not fit."""
        if self.needs_block(seq):
            self.append_block(seq)

    def append_block(self, seq: Sequence) -> None:
        """One more block at the end of the sequence's table."""
        if not self._free:
            raise RuntimeError("no free KV block; call can_append first")
        seq.block_table.append(self._take_free_block())

    def free(self, seq: Sequence) -> None:
        for index in reversed(range(len(seq.block_table))):  # a prefix's tail is evicted first
            block = seq.block_table[index]
            if (index + 1) * self.block_size > seq.num_computed_tokens:
                self._forget(block)  # never computed (a step failed or it was aborted first): not shareable
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def _take_free_block(self) -> int:
        block, _ = self._free.popitem(last=False)
        self._forget(block)  # its old content is about to be overwritten
        self._ref_counts[block] = 1
        return block

    def _remember(self, block: int, prefix_hash: int, tokens: tuple[int, ...]) -> None:
        previous = self._cached.get(prefix_hash)
        if previous is not None and previous != block:
            self._forget(previous)  # the same prefix computed twice: keep the newer copy
        self._cached[prefix_hash] = block
        self._block_hash[block] = prefix_hash
        self._block_tokens[block] = tokens

    def _forget(self, block: int) -> None:
        prefix_hash = self._block_hash.pop(block, None)
        self._block_tokens.pop(block, None)
        if prefix_hash is not None and self._cached.get(prefix_hash) == block:
            del self._cached[prefix_hash]
