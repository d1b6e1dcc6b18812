"""The native engine's GPU paths (marked gpu: skipped, visibly, where there is no CUDA device)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


@pytest.mark.parametrize("seed, lengths, heads, kv_heads", [
    (0, [1], 32, 8), (1, [17, 5, 300], 32, 8), (2, [64] * 8, 9, 3), (3, [1000, 1, 33, 129], 32, 32),
    (4, [4096, 7], 32, 8),
])
def test_paged_decode_kernel_matches_the_torch_reference(seed, lengths, heads, kv_heads):
    from engines.native.kernels import paged_decode_attention
    from engines.native.model import AttentionMetadata, batched_decode_attention

    generator = torch.Generator(device="cuda").manual_seed(seed)
    block_size, head_dim = 16, 128 if heads != 9 else 64
    needed = sum((n + block_size - 1) // block_size for n in lengths)
    num_blocks = needed + 7
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", generator=generator).bfloat16()
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", generator=generator).bfloat16()
    order = torch.randperm(num_blocks, device="cuda", generator=generator).tolist()
    tables, start = [], 0
    for n in lengths:
        count = (n + block_size - 1) // block_size
        tables.append(order[start:start + count])
        start += count
    width = max(len(t) for t in tables) + 3  # padded like a captured step
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], device="cuda")
    context = torch.tensor(lengths, device="cuda")
    q = torch.randn(len(lengths), heads, head_dim, device="cuda", generator=generator).bfloat16()
    meta = AttentionMetadata(False, torch.zeros(0, dtype=torch.long, device="cuda"), context, block_tables, [])
    expected = batched_decode_attention(q.float(), k_cache.float(), v_cache.float(), meta, head_dim ** -0.5)
    got = paged_decode_attention(q, k_cache, v_cache, block_tables, context, head_dim ** -0.5)
    assert torch.isfinite(got).all()  # every element written (the output starts uninitialised)
    relative = ((got.float() - expected).norm() / expected.norm()).item()
    print(f"lengths {lengths}: relative error {relative:.2e}")
    assert relative < 1e-2  # bf16 inputs


def test_a_captured_decode_step_gives_the_eager_logits():
    from engines.base import SamplingParams
    from engines.native.block_manager import BlockManager
    from engines.native.model_runner import ModelRunner, RunnerConfig
    from engines.native.sequence import Sequence

    runner = ModelRunner(RunnerConfig("cuda", "bfloat16", 16, 8192, max_context_tokens=1024), shape="smollm2-135m")
    manager = BlockManager(runner.num_blocks, 16)
    generator = torch.Generator().manual_seed(5)
    seqs = [Sequence(f"s{i}", torch.randint(0, 49152, (n,), generator=generator).tolist(),
                     SamplingParams(max_tokens=8, temperature=0)) for i, n in enumerate([3, 40, 17])]
    for seq in seqs:
        manager.allocate(seq)
    runner.logits(seqs, True)  # prefill writes the prompts' K/V
    for seq in seqs:
        seq.num_computed_tokens = seq.num_tokens
        seq.token_ids.append(7)
        manager.may_append(seq)
    eager = runner.logits(seqs, False)
    graphed = runner._decode_with_graph(seqs)
    relative = ((graphed - eager).norm() / eager.norm()).item()
    assert relative < 1e-2 and torch.equal(graphed.argmax(-1), eager.argmax(-1))


def test_fused_rms_norm_and_rope_match_torch():
    from engines.native import kernels
    from engines.native.model import apply_rope

    generator = torch.Generator(device="cuda").manual_seed(11)
    for hidden in (576, 4096):
        x = torch.randn(37, hidden, device="cuda", generator=generator).bfloat16()
        weight = torch.randn(hidden, device="cuda", generator=generator).bfloat16()
        variance = x.float().pow(2).mean(-1, keepdim=True)
        expected = x.float() * torch.rsqrt(variance + 1e-5) * weight.float()
        got = kernels.rms_norm(x, weight, 1e-5).float()
        assert ((got - expected).norm() / expected.norm()).item() < 1e-2
    q = torch.randn(29, 32, 128, device="cuda", generator=generator).bfloat16()
    angles = torch.rand(29, 64, device="cuda", generator=generator) * 100
    cos, sin = angles.cos(), angles.sin()
    expected = apply_rope(q.clone(), cos, sin).float()
    got = kernels.apply_rope_inplace(q.clone(), cos, sin).float()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2
