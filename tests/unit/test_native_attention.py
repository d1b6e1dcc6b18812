"""The native engine's attention paths agree with each other on random paged caches."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from engines.native.model import (  # noqa: E402
    AttentionMetadata,
    LlamaConfig,
    apply_rope,
    batched_decode_attention,
    reference_attention,
    rope_inverse_frequencies,
)


def random_cache(seed: int, lengths: list[int], block_size=4, kv_heads=2, head_dim=8, num_blocks=64):
    generator = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    order = torch.randperm(num_blocks, generator=generator).tolist()  # scattered, not contiguous
    tables, start = [], 0
    for length in lengths:
        count = (length + block_size - 1) // block_size
        tables.append(order[start:start + count])
        start += count
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return k_cache, v_cache, block_tables


@pytest.mark.parametrize("seed", range(5))
def test_batched_decode_equals_the_reference(seed):
    lengths = [1, 5, 13, 4, 22][: 2 + seed % 4]
    k_cache, v_cache, tables = random_cache(seed, lengths)
    q = torch.randn(len(lengths), 6, 8, generator=torch.Generator().manual_seed(100 + seed))  # 6 heads, GQA 3:1
    meta = AttentionMetadata(False, torch.zeros(0, dtype=torch.long), torch.tensor(lengths), tables, [])
    expected = reference_attention(q, k_cache, v_cache, meta, 8 ** -0.5)
    got = batched_decode_attention(q, k_cache, v_cache, meta, 8 ** -0.5)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


def test_decode_ignores_what_lies_past_each_context():
    k_cache, v_cache, tables = random_cache(7, [5, 9])
    q = torch.randn(2, 6, 8)
    meta = AttentionMetadata(False, torch.zeros(0, dtype=torch.long), torch.tensor([5, 9]), tables, [])
    before = batched_decode_attention(q, k_cache, v_cache, meta, 1.0)
    k_cache[tables[0, 1], 1:] = 1e4  # positions 5.. of sequence 0: beyond its context
    v_cache[tables[0, 1], 1:] = 1e4
    after = batched_decode_attention(q, k_cache, v_cache, meta, 1.0)
    assert torch.allclose(before[0], after[0])


def test_decode_is_not_reached_by_a_nan_in_another_sequences_block():
    """Block tables are padded with block 0, which belongs to some other sequence: a NaN there
    (that sequence's activations overflowed) must not reach this one as 0 x NaN."""
    k_cache, v_cache, tables = random_cache(8, [5, 22])
    q = torch.randn(2, 6, 8)
    meta = AttentionMetadata(False, torch.zeros(0, dtype=torch.long), torch.tensor([5, 22]), tables, [])
    before = batched_decode_attention(q, k_cache, v_cache, meta, 1.0)
    assert tables[0, -1] == 0 and 0 not in tables[0, :2]  # sequence 0's table is padded with block 0
    k_cache[0], v_cache[0] = float("nan"), float("nan")
    after = batched_decode_attention(q, k_cache, v_cache, meta, 1.0)
    assert torch.allclose(before[0], after[0])


def test_llama3_rope_scaling_slows_only_low_frequencies():
    base = LlamaConfig(1000, 64, 128, 1, 4, 2, rope_theta=500000.0)
    scaled = LlamaConfig(1000, 64, 128, 1, 4, 2, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    plain, slowed = rope_inverse_frequencies(base), rope_inverse_frequencies(scaled)
    assert torch.allclose(plain[0], slowed[0])  # the highest frequency is kept
    assert torch.allclose(plain[-1] / 8, slowed[-1])  # the lowest is divided by the factor
    x = torch.randn(3, 2, 16)
    angles = torch.arange(3).float()[:, None] * rope_inverse_frequencies(LlamaConfig(10, 32, 64, 1, 2, 2))[None]
    rotated = apply_rope(x, angles.cos(), angles.sin())
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation keeps length
