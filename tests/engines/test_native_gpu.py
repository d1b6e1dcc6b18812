"""The native engine's GPU kernels and paths against the plain-torch reference, on fresh random
inputs (marked gpu: skipped, visibly, where there is no CUDA device). Each kernel's output comes
from memory that was filled with NaN just before, so an element it fails to write fails the test."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


def poison_allocator() -> None:
    """Fill the caching allocator's free memory with NaN so the next allocations start as NaN."""
    torch.empty(64 << 20, dtype=torch.float32, device="cuda").fill_(float("nan"))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "an output element was not written"
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def paged_cache(generator, lengths, kv_heads, head_dim, block_size=16, spare=7):
    needed = sum((n + block_size - 1) // block_size for n in lengths)
    num_blocks = needed + spare
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(*shape, device="cuda", generator=generator).bfloat16()
    v_cache = torch.randn(*shape, device="cuda", generator=generator).bfloat16()
    order = torch.randperm(num_blocks, device="cuda", generator=generator).tolist()
    tables, start = [], 0
    for n in lengths:
        count = (n + block_size - 1) // block_size
        tables.append(order[start:start + count])
        start += count
    width = max(len(t) for t in tables) + 3  # padded like a captured step
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], device="cuda")
    return k_cache, v_cache, block_tables


# Splits (None: attention_kernels.context_splits): [1] is one chunk, [17, 5, 300] cuts 300 in two
# chunks of 256 keys, [4096, 7] in eight, [1000, 1, 33, 129] with 32 KV heads fills the SMs
# unsplit; the last case forces 16 splits on 64-key tiles (2,100 keys: 11 chunks of 192).
@pytest.mark.parametrize("seed, lengths, heads, kv_heads, tile, splits", [
    (0, [1], 32, 8, None, None), (1, [17, 5, 300], 32, 8, None, None), (2, [64] * 8, 9, 3, None, None),
    (3, [1000, 1, 33, 129], 32, 32, None, None), (4, [4096, 7], 32, 8, None, None),
    (5, [200, 64, 65], 32, 8, (64, 4, 3), None), (6, [2100, 257, 256, 1], 32, 8, (64, 4, 3), 16),
])
def test_decode_kernel_rotates_caches_and_attends_like_the_torch_reference(seed, lengths, heads, kv_heads, tile,
                                                                           splits):
    from engines.native.attention_kernels import rope_cache_and_decode_attention
    from engines.native.model import AttentionMetadata, apply_rope, batched_decode_attention

    generator = torch.Generator(device="cuda").manual_seed(seed)
    head_dim = 128 if heads != 9 else 64
    seqs, block_size = len(lengths), 16
    k_cache, v_cache, block_tables = paged_cache(generator, lengths, kv_heads, head_dim, block_size)
    context = torch.tensor(lengths, device="cuda")
    slots = torch.stack([block_tables[i, (n - 1) // block_size] * block_size + (n - 1) % block_size
                         for i, n in enumerate(lengths)])  # where each sequence's new token goes
    qkv = torch.randn(seqs, (heads + 2 * kv_heads) * head_dim, device="cuda", generator=generator).bfloat16()
    angles = torch.rand(seqs, head_dim // 2, device="cuda", generator=generator) * 100
    cos, sin = angles.cos(), angles.sin()
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q = apply_rope(qkv[:, :q_size].view(seqs, heads, head_dim), cos, sin)
    k = apply_rope(qkv[:, q_size:q_size + kv_size].view(seqs, kv_heads, head_dim), cos, sin)
    v = qkv[:, q_size + kv_size:].view(seqs, kv_heads, head_dim)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_k.view(-1, kv_heads, head_dim)[slots] = k
    expected_v.view(-1, kv_heads, head_dim)[slots] = v
    meta = AttentionMetadata(False, slots, context, block_tables, [])
    expected = batched_decode_attention(q.float(), expected_k.float(), expected_v.float(), meta, head_dim ** -0.5)
    poison_allocator()
    got = rope_cache_and_decode_attention(qkv, cos, sin, slots, k_cache, v_cache, block_tables, context, heads,
                                          head_dim ** -0.5, tile, splits)
    assert relative_error(got, expected) < 1e-2  # bf16 inputs
    assert relative_error(k_cache.view(-1, kv_heads, head_dim)[slots], k) < 1e-2  # the new keys, rotated
    assert torch.equal(v_cache.view(-1, kv_heads, head_dim)[slots], v)
    for cache, reference in ((k_cache, expected_k), (v_cache, expected_v)):  # and nothing else written
        cache.view(-1, kv_heads, head_dim)[slots] = 0
        reference.view(-1, kv_heads, head_dim)[slots] = 0
        assert torch.equal(cache, reference)


@pytest.mark.parametrize("seed, queries, contexts, heads, kv_heads, head_dim", [
    (0, [7], [7], 32, 8, 128),
    (1, [128, 1, 300, 64], [128, 1, 300, 64], 32, 8, 128),
    (2, [50, 20], [90, 20], 9, 3, 64),  # the first sequence already has 40 tokens cached
    (3, [2048], [2048], 32, 8, 128),
])
def test_paged_prefill_kernel_matches_the_torch_reference(seed, queries, contexts, heads, kv_heads, head_dim):
    from engines.native.attention_kernels import paged_prefill_attention
    from engines.native.model import AttentionMetadata, reference_attention

    generator = torch.Generator(device="cuda").manual_seed(seed)
    k_cache, v_cache, block_tables = paged_cache(generator, contexts, kv_heads, head_dim)
    starts = [0]
    for n in queries:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, head_dim, device="cuda", generator=generator).bfloat16()
    context = torch.tensor(contexts, device="cuda")
    meta = AttentionMetadata(True, torch.zeros(0, dtype=torch.long, device="cuda"), context, block_tables, starts)
    expected = reference_attention(q.float(), k_cache.float(), v_cache.float(), meta, head_dim ** -0.5)
    poison_allocator()
    got = paged_prefill_attention(q, k_cache, v_cache, block_tables, context, torch.tensor(starts, device="cuda"),
                                  max(queries), head_dim ** -0.5)
    assert relative_error(got, expected) < 1e-2


def test_rope_and_cache_write_matches_torch():
    from engines.native.kernels import rope_and_cache_write
    from engines.native.model import apply_rope

    generator = torch.Generator(device="cuda").manual_seed(7)
    tokens, heads, kv_heads, head_dim = 29, 32, 8, 128
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda", generator=generator).bfloat16()
    angles = torch.rand(tokens, head_dim // 2, device="cuda", generator=generator) * 100
    cos, sin = angles.cos(), angles.sin()
    slots = torch.randperm(64 * 16, device="cuda", generator=generator)[:tokens]
    k_cache = torch.full((64, 16, kv_heads, head_dim), float("nan"), device="cuda").bfloat16()
    v_cache = k_cache.clone()
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    expected_q = apply_rope(qkv[:, :q_size].view(tokens, heads, head_dim), cos, sin)
    expected_k = apply_rope(qkv[:, q_size:q_size + kv_size].view(tokens, kv_heads, head_dim), cos, sin)
    expected_v = qkv[:, q_size + kv_size:].view(tokens, kv_heads, head_dim).clone()
    rope_and_cache_write(qkv, cos, sin, slots, k_cache, v_cache, heads)
    assert relative_error(qkv[:, :q_size].view(tokens, heads, head_dim), expected_q) < 1e-2
    assert relative_error(k_cache.view(-1, kv_heads, head_dim)[slots], expected_k) < 1e-2
    assert torch.equal(v_cache.view(-1, kv_heads, head_dim)[slots], expected_v)


def test_fused_rms_norm_and_silu_match_torch():
    from engines.native import kernels

    generator = torch.Generator(device="cuda").manual_seed(11)
    for hidden in (576, 4096):
        x = torch.randn(37, hidden, device="cuda", generator=generator).bfloat16()
        weight = torch.randn(hidden, device="cuda", generator=generator).bfloat16()
        variance = x.float().pow(2).mean(-1, keepdim=True)
        expected = x.float() * torch.rsqrt(variance + 1e-5) * weight.float()
        poison_allocator()
        assert relative_error(kernels.rms_norm(x, weight, 1e-5), expected) < 1e-2
    gate_up = torch.randn(5, 2 * 14336, device="cuda", generator=generator).bfloat16()
    gate, up = gate_up.float().chunk(2, dim=-1)
    poison_allocator()
    assert relative_error(kernels.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up) < 1e-2


def test_a_decode_kernel_is_asked_to_run_in_the_decode_shared_memory_configuration():
    import ctypes

    from engines.native import carveout, kernels

    x = torch.randn(3, 4096, device="cuda").bfloat16()
    weight = torch.ones(4096, device="cuda").bfloat16()
    out = torch.empty_like(x)
    launched = kernels._rms_norm_kernel[(3,)](x, weight, out, x.stride(0), 4096, 1e-5, BLOCK=4096, num_warps=8,
                                              DEPENDENT=False)
    carveout.share_decode_configuration(launched)
    carveout.share_decode_configuration(launched)  # once per kernel: a second call changes nothing
    preferred = ctypes.c_int()
    assert carveout._driver().cuFuncGetAttribute(ctypes.byref(preferred), carveout._PREFERRED_CARVEOUT,
                                                 ctypes.c_void_p(launched.function)) == 0
    max_shared = carveout._max_shared_per_sm(torch.cuda.current_device())
    assert max_shared >= 100 * 1024  # an SM's shared memory, from the driver (228 KB on an H100)
    assert preferred.value == carveout.carveout_percent(0, max_shared)  # a small kernel: the decode configuration
    assert preferred.value * max_shared / 100 <= carveout.DECODE_SHARED_BYTES


INT4_SHAPES = [(4096, 4096), (6144, 4096), (4096, 14336), (576, 576), (1536, 576), (576, 1536)]


@pytest.mark.parametrize("rows", [1, 3, 8, 16, 33, 64, 200])
@pytest.mark.parametrize("n, k", INT4_SHAPES)
def test_int4_matmul_matches_dequantize_then_matmul(rows, n, k):
    from engines.native.int4_kernels import int4_matmul
    from engines.native.quantization import quantize_rtn

    generator = torch.Generator(device="cuda").manual_seed(rows * 7 + n + k)
    weight = quantize_rtn(torch.randn(n, k, device="cuda", generator=generator) * 0.02)
    dense = weight.dequantize(torch.float32)  # [N, K]
    x = torch.randn(rows, k, device="cuda", generator=generator).bfloat16()
    residual = torch.randn(rows, n, device="cuda", generator=generator).bfloat16()
    expected = x.float() @ dense.T
    poison_allocator()
    assert relative_error(int4_matmul(x, weight), expected) < 1e-2
    poison_allocator()
    assert relative_error(int4_matmul(x, weight, residual=residual), expected + residual.float()) < 1e-2
    gate, up = expected.chunk(2, dim=-1)
    poison_allocator()
    assert relative_error(int4_matmul(x, weight, gated=True), torch.nn.functional.silu(gate) * up) < 1e-2


INT4_PATHS = ["gemv", "tensor cores", "tensor cores, no inline asm", "tensor cores, split K", "skinny, one program",
              "skinny, a program a group", "skinny, stream K", "skinny, stream K in waves", "skinny, 256-row tiles",
              "skinny, stream K, one row (fixed-point split K)", "wgmma, a program a tile",
              "wgmma, split K", "wgmma, 8 warps, x two groups ahead", "wgmma, a ring of 3 groups",
              "dequantize + cuBLAS"]


@pytest.mark.parametrize("layout", ["scales row by row", "scales group by group", "words tiled"])
@pytest.mark.parametrize("path", INT4_PATHS)
def test_int4_kernels_unpack_every_value_exactly(path, layout):
    """Scale 1 with x = identity: the output is the stored integers minus their zero points, exactly."""
    from engines.native.int4_kernels import GEMV_CONFIG, DotConfig, SkinnyConfig, WgmmaConfig, int4_matmul
    from engines.native.quantization import Int4Weight, pack_int4

    # The skinny kernel's programs share out 4 (tile, group) units: all in one (whole tiles, one
    # after the other), one each (every tile through the workspace), or 1, 1 and 2 (both ways;
    # also as three waves of one program resident).
    config = dict(zip(INT4_PATHS, [GEMV_CONFIG, DotConfig(64, 64, 1, 4, 3), DotConfig(64, 64, 1, 4, 3, False),
                                   DotConfig(64, 32, 10**6, 4, 3), SkinnyConfig(64, 1, 4),
                                   SkinnyConfig(64, 10**6, 4), SkinnyConfig(64, 3, 4), SkinnyConfig(64, 1, 4, 3),
                                   SkinnyConfig(256, 3, 8), SkinnyConfig(64, 3, 4), WgmmaConfig(64, 4, 1),
                                   WgmmaConfig(64, 4, 10**6),
                                   WgmmaConfig(128, 8, 1, 2), WgmmaConfig(64, 4, 1, 1, 3), None]))[path]
    n, k = 96, 256  # two row tiles of 64, the second half empty
    if layout == "words tiled":
        n = 384  # three blocks of 128 rows (quantization.UNIT_ROWS); six or three row tiles
    values = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8)
    zeros = torch.randint(0, 16, (n, k // 128), device="cuda", dtype=torch.uint8)
    weight = Int4Weight(pack_int4(values), torch.ones(n, k // 128, dtype=torch.float16, device="cuda"), zeros)
    if layout == "scales group by group":
        weight = weight.group_major()
    if layout == "words tiled":
        weight = weight.group_major().tile()
        assert weight.tiled
    identity = torch.eye(k, device="cuda", dtype=torch.bfloat16)
    rows = {SkinnyConfig: 16, WgmmaConfig: 128}.get(type(config), k)  # the most rows a call of that kernel takes
    if "one row" in path:
        rows = 1
    out = torch.cat([int4_matmul(identity[i:i + rows], weight, config=config) for i in range(0, k, rows)])
    expected = values.float() - zeros.float().repeat_interleave(128, dim=1)
    assert torch.equal(out.float(), expected.T)  # [K, N] = W.T


def split_k_case(rows: int, seed: int, x_scale: float):
    """(an INT4 weight of 1056 x 4096, x [rows, 4096]) and, per epilogue ("plain" with a residual,
    "gated"), (int4_matmul's keyword arguments, dequantize-then-matmul's answer)."""
    from engines.native.quantization import quantize_rtn

    n, k = 1056, 4096  # 32 groups a tile; 17 tiles of 64 rows (9 gated), the last partly empty
    generator = torch.Generator(device="cuda").manual_seed(seed)
    weight = quantize_rtn(torch.randn(n, k, device="cuda", generator=generator) * 0.02).group_major()
    x = (torch.randn(rows, k, device="cuda", generator=generator) * x_scale).bfloat16()
    residual = torch.randn(rows, n, device="cuda", generator=generator).bfloat16()
    expected = x.float() @ weight.dequantize(torch.float32).T
    gate, up = expected.chunk(2, dim=-1)
    return weight, x, {"plain": (dict(residual=residual), expected + residual.float()),
                       "gated": (dict(gated=True), torch.nn.functional.silu(gate) * up)}


@pytest.mark.parametrize("rows", [1, 2])
def test_skinny_fixed_point_split_k_repeats_bit_for_bit_and_matches_the_float_fix_up(rows, monkeypatch):
    """Split K through int64 fixed-point cells (int4_skinny.FIXED_BITS), plain and gated, against
    the float atomics' fix-up and dequantize-then-matmul; integer adds make it order-independent."""
    from engines.native import int4_kernels
    from engines.native.int4_kernels import SkinnyConfig, int4_matmul

    weight, x, epilogues = split_k_case(rows, seed=rows, x_scale=30)  # outputs in the tens
    config = SkinnyConfig(64, 40, 4)  # 544 units over 40 programs: most tiles split two or three ways
    for kwargs, want in (epilogues["plain"], epilogues["gated"]):
        monkeypatch.setattr(int4_kernels, "FIXED_ROWS", rows)
        monkeypatch.setattr(int4_kernels, "FIXED_GATED_ROWS", rows)
        fixed = [int4_matmul(x, weight, config=config, **kwargs) for _ in range(3)]
        monkeypatch.setattr(int4_kernels, "FIXED_ROWS", 0)
        monkeypatch.setattr(int4_kernels, "FIXED_GATED_ROWS", 0)
        floating = int4_matmul(x, weight, config=config, **kwargs)
        assert all(torch.equal(fixed[0], again) for again in fixed[1:])
        assert relative_error(fixed[0], want) < 1e-2
        assert relative_error(fixed[0], floating.float()) < 1e-2


@pytest.mark.timeout(120, method="thread")  # a gated cell whose count never completes spins: fail, not hang
@pytest.mark.parametrize("broken", ["nan", "inf", "1e30"])
def test_skinny_fixed_point_cells_survive_a_broken_input_and_leave_the_next_call_right(broken):
    """A non-finite or huge input must not carry into a fixed-point cell's group count (a NaN did
    before int4_skinny.PARTIAL_LIMIT: the next call's outputs were wrong, and a gated cell whose
    count never completes keeps its thread waiting). The broken call finishes, and the next call
    on the same workspace is right."""
    from engines.native.int4_kernels import SkinnyConfig, int4_matmul

    weight, x, epilogues = split_k_case(1, seed=7, x_scale=1)
    bad = x.clone()
    bad[0, 5] = float(broken)
    config = SkinnyConfig(64, 40, 4)  # most tiles split two or three ways: through the cells
    for kwargs, want in (epilogues["gated"], epilogues["plain"]):
        int4_matmul(bad, weight, config=config, **kwargs)
        torch.cuda.synchronize()  # returns: no thread is left waiting on a cell
        assert relative_error(int4_matmul(x, weight, config=config, **kwargs), want) < 1e-2


@pytest.mark.parametrize("config", ["128-row tiles, 8 warps, x two groups ahead", "the same, a program a group",
                                    "64-row tiles, 4 warps, K split unevenly", "256-row tiles, a ring of 3 groups",
                                    "64-row tiles, a ring of 2 groups, K split unevenly"])
@pytest.mark.parametrize("words", ["row by row", "tiled"])
@pytest.mark.parametrize("rows", [9, 33, 64, 100, 128])
def test_wgmma_kernel_matches_dequantize_then_matmul_with_every_epilogue(rows, config, words):
    from engines.native.int4_kernels import WgmmaConfig, int4_matmul
    from engines.native.quantization import quantize_rtn

    config = {"128-row tiles, 8 warps, x two groups ahead": WgmmaConfig(128, 8, 1, 2),
              "the same, a program a group": WgmmaConfig(128, 8, 10**6, 2),
              "64-row tiles, 4 warps, K split unevenly": WgmmaConfig(64, 4, 60),  # 17 tiles x 3 slices
              "256-row tiles, a ring of 3 groups": WgmmaConfig(256, 8, 1, 1, 3),
              "64-row tiles, a ring of 2 groups, K split unevenly": WgmmaConfig(64, 4, 60, 1, 2)}[config]
    n, k = 1056, 1280  # 10 groups; the last tile partly empty (1056 rows, 528 gated outputs)
    if words == "tiled":
        n = 1152  # 9 blocks of 128 rows; the up rows start mid-block (576)
    generator = torch.Generator(device="cuda").manual_seed(rows)
    weight = quantize_rtn(torch.randn(n, k, device="cuda", generator=generator) * 0.02).group_major()
    if words == "tiled":
        weight = weight.tile()
        assert weight.tiled
    x = torch.randn(rows, k, device="cuda", generator=generator).bfloat16()
    residual = torch.randn(rows, n, device="cuda", generator=generator).bfloat16()
    expected = x.float() @ weight.dequantize(torch.float32).T
    poison_allocator()
    assert relative_error(int4_matmul(x, weight, config=config), expected) < 1e-2
    poison_allocator()
    assert relative_error(int4_matmul(x, weight, residual=residual, config=config), expected + residual.float()) < 1e-2
    gate, up = expected.chunk(2, dim=-1)
    poison_allocator()
    assert relative_error(int4_matmul(x, weight, gated=True, config=config), torch.nn.functional.silu(gate) * up) < 1e-2


@pytest.mark.parametrize("rows, n, k", [(1, 960, 576), (3, 3072, 576), (2, 4608, 576), (1, 6144, 4096), (2, 28672, 4096)])
def test_int4_matmul_with_the_rms_norm_fused_matches_norm_then_matmul(rows, n, k):
    from engines.native.int4_kernels import int4_matmul
    from engines.native.quantization import quantize_rtn

    generator = torch.Generator(device="cuda").manual_seed(rows + n + k)
    weight = quantize_rtn(torch.randn(n, k, device="cuda", generator=generator) * 0.02)
    x = (torch.randn(rows, k, device="cuda", generator=generator) * 3).bfloat16()
    norm_weight = (torch.rand(k, device="cuda", generator=generator) + 0.5).bfloat16()
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * norm_weight.float()
    expected = normed @ weight.dequantize(torch.float32).T
    gate, up = expected.chunk(2, dim=-1)
    for stored in (weight, weight.tile()):  # words row by row, and tiled where they fit (k = 4096)
        poison_allocator()
        assert relative_error(int4_matmul(x, stored, norm=(norm_weight, 1e-5)), expected) < 1e-2
        assert relative_error(int4_matmul(x, stored, gated=True, norm=(norm_weight, 1e-5)),
                              torch.nn.functional.silu(gate) * up) < 1e-2


def test_argmax_rows_matches_torch_including_ties():
    from engines.native.kernels import argmax_rows

    generator = torch.Generator(device="cuda").manual_seed(11)
    logits = torch.randn(5, 128256, device="cuda", generator=generator)
    logits[1, [7, 5000, 100000]] = 50.0  # a tie across blocks: the first wins
    logits[2, [4096, 4097]] = 50.0  # a tie inside a block
    logits[3, [2048, 2047]] = 50.0  # a tie across the boundary of two chunks (kernels.ARGMAX_CHUNK)
    assert torch.equal(argmax_rows(logits), logits.argmax(-1))


@pytest.mark.parametrize("fed", [False, True])
def test_embed_and_rotary_tables_give_torch_embedding_cos_and_sin(fed):
    """The step's first kernel against torch: the embedding rows (each id taken from the fed ids
    where its flag is set), and cos / sin of positions up to the longest context, where an
    approximate cosine would be off."""
    from engines.native.kernels import embed_and_rotary_tables
    from engines.native.model import NAMED_SHAPES, rope_inverse_frequencies

    generator = torch.Generator(device="cuda").manual_seed(3)
    table = torch.randn(1000, 4096, device="cuda", generator=generator).bfloat16()
    inv_freq = rope_inverse_frequencies(NAMED_SHAPES["llama-3-8b"]).cuda()
    ids = torch.randint(0, 1000, (7,), device="cuda", generator=generator)
    positions = torch.tensor([0, 1, 5, 127, 4095, 8191, 131071], device="cuda")
    flags = torch.tensor([1, 0, 1, 1, 0, 0, 1], device="cuda")
    fed_ids = torch.randint(0, 1000, (7,), device="cuda", generator=generator)
    x, cos, sin = embed_and_rotary_tables(table, ids, positions, inv_freq, (flags, fed_ids) if fed else None)
    angles = positions.float()[:, None] * inv_freq[None, :]
    assert torch.equal(x, table[torch.where(flags.bool(), fed_ids, ids) if fed else ids])
    assert torch.allclose(cos, angles.cos(), rtol=0, atol=1e-6)
    assert torch.allclose(sin, angles.sin(), rtol=0, atol=1e-6)


def test_argmax_rows_answers_torchs_first_maximum_and_nan_logits_for_a_row_with_a_nan():
    """A row holding a NaN answers NAN_LOGITS, whichever chunk holds it (so that the request is
    failed), never a padding column past the vocabulary; every other row torch.argmax's answer."""
    from engines.native.kernels import argmax_rows
    from engines.native.sampler import greedy_tokens
    from engines.native.sequence import NAN_LOGITS

    generator = torch.Generator(device="cuda").manual_seed(12)
    size = 128256  # 63 chunks of kernels.ARGMAX_CHUNK, the last one partly padding
    logits = torch.randn(8, size, device="cuda", generator=generator)
    logits[0, 70000] = float("nan")
    logits[1, size - 1] = float("nan")  # in the partly padded last chunk
    logits[2, [4500, 100, 90000]] = float("nan")  # the first of several, in different chunks
    logits[3] = float("nan")
    logits[4] = float("-inf")
    logits[5, 10], logits[5, 20] = float("inf"), float("nan")  # NaN beats +inf
    logits[6, 2047], logits[6, 2048] = float("inf"), float("inf")
    logits[7, 127000:] = float("nan")
    assert torch.equal(logits.argmax(-1), torch.tensor([70000, size - 1, 100, 0, 0, 20, 2047, 127000], device="cuda"))
    nan = NAN_LOGITS
    expected = torch.tensor([nan, nan, nan, nan, 0, nan, 2047, nan], device="cuda")
    assert torch.equal(greedy_tokens(logits), expected)
    assert torch.equal(argmax_rows(logits), expected)


@pytest.mark.timeout(180, method="thread")  # a step that never finishes fails the test instead of hanging it
def test_a_captured_int4_step_with_nan_activations_finishes_and_the_next_step_is_right(monkeypatch):
    """A NaN in a decode step's activations (here from a poisoned embedding row) reaches every
    INT4 kernel's split-K cells: the step must finish, answer greedy_tokens of whatever logits it
    made (the cells clamp a NaN, so they may be finite), and leave the workspace right for the next step."""
    from engines.native.model import NAMED_SHAPES, LlamaConfig
    from engines.native.model_runner import ModelRunner, RunnerConfig
    from engines.native.sampler import greedy_tokens
    from engines.native.sequence import NAN_LOGITS

    # Llama-shaped, 128-input groups: the stream-K skinny kernel and its fixed-point cells
    monkeypatch.setitem(NAMED_SHAPES, "small-llama", LlamaConfig(32000, 2048, 5632, 4, 16, 4))
    runner = ModelRunner(RunnerConfig("cuda", "bfloat16", 16, 4096, max_context_tokens=1024, quantize="int4"),
                         shape="small-llama")
    poisoned_token = 13
    clean, broken = prefilled_for_decode(runner, [6, 9], seed=8, next_token=poisoned_token)
    clean.token_ids[-1] = 11
    expected = runner.logits([clean], False)
    runner._decode_with_graph([clean], None)  # captures the batch-1 step
    table = runner.model.embed_tokens.weight
    row = table[poisoned_token].clone()
    table[poisoned_token] = float("nan")
    logits, greedy, _ = runner._decode_with_graph([broken], None)
    torch.cuda.synchronize()  # returns: no program is left waiting on a cell
    assert torch.equal(greedy, greedy_tokens(logits)) and (greedy.item() == NAN_LOGITS or 0 <= greedy.item() < 32000)
    table[poisoned_token] = row
    assert relative_error(runner._decode_with_graph([clean], None)[0], expected) < 2e-2


def prefilled_for_decode(runner, lengths: list[int], seed: int, next_token: int) -> list:
    """Sequences of random prompts of `lengths`, prefilled (their K/V in the cache), each with
    `next_token` appended: ready for one decode step."""
    from engines.base import SamplingParams
    from engines.native.block_manager import BlockManager
    from engines.native.sequence import Sequence

    manager = BlockManager(runner.num_blocks, runner.config.block_size)
    generator = torch.Generator().manual_seed(seed)
    vocab = runner.model_config.vocab_size
    seqs = [Sequence(f"s{i}", torch.randint(0, vocab, (n,), generator=generator).tolist(),
                     SamplingParams(max_tokens=8, temperature=0)) for i, n in enumerate(lengths)]
    for seq in seqs:
        manager.allocate(seq)
    runner.logits(seqs, True)  # prefill writes the prompts' K/V
    for seq in seqs:
        seq.num_computed_tokens = seq.num_tokens
        seq.token_ids.append(next_token)
        manager.may_append(seq)
    return seqs


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_a_captured_decode_step_gives_the_eager_logits(quantize):
    from engines.native.model_runner import ModelRunner, RunnerConfig

    runner = ModelRunner(RunnerConfig("cuda", "bfloat16", 16, 8192, max_context_tokens=1024, quantize=quantize),
                         shape="smollm2-135m")
    seqs = prefilled_for_decode(runner, [3, 40, 17], seed=5, next_token=7)
    eager = runner.logits(seqs, False)
    runner._decode_with_graph(seqs, None)  # captures
    poison_allocator()  # memory the graph reads must not have been handed back to the allocator
    graphed, greedy, _ = runner._decode_with_graph(seqs, None)
    assert relative_error(graphed, eager) < 1e-2
    # The captured greedy tokens are the first maximum of the captured logits. (Not compared with
    # the eager argmax: random weights leave near ties, and INT4's split-K sums are added in
    # whatever order programs finish, so a near tie may go either way; session 12 saw every row so.)
    assert torch.equal(greedy, graphed.argmax(-1))


def test_warm_up_captures_the_decode_graphs_and_writes_no_sequence_cache():
    from engines.native.model_runner import ModelRunner, RunnerConfig

    runner = ModelRunner(RunnerConfig("cuda", "bfloat16", 16, 8192, max_context_tokens=1024), shape="smollm2-135m")
    seqs = prefilled_for_decode(runner, [3, 40], seed=9, next_token=5)
    before = runner.logits(seqs, False)
    assert runner.warm_up(3) == [1, 2, 4]  # the graphs that hold up to 3 sequences
    assert sorted(runner._graphs) == [1, 2, 4]
    assert torch.equal(runner.logits(seqs, False), before)  # the warm-up's prefills went to the scratch block


@pytest.mark.parametrize("lengths", [[1, 30], [5, 30, 2, 17, 9, 1, 12, 40, 3, 8, 21, 6]], ids=["skinny", "wgmma"])
def test_dependent_launch_gives_the_logits_of_launching_one_kernel_after_another(lengths, monkeypatch):
    """Each kernel of a step starts before the one it depends on has finished (kernels.py) and
    must wait for it before touching its results: a missing or misplaced wait reads stale
    activations or workspaces and changes the logits."""
    from engines.native import kernels
    from engines.native.int4_kernels import SkinnyConfig, WgmmaConfig, kernel_config
    from engines.native.model import NAMED_SHAPES, LlamaConfig
    from engines.native.model_runner import ModelRunner, RunnerConfig

    if not kernels.dependent_launch(torch.device("cuda")):
        pytest.skip("dependent launch needs a Hopper or later GPU")
    # Llama-shaped and small, with 128-input groups, so that every INT4 matmul of a decode step is
    # the stream-K skinny kernel (2 sequences) or, on Hopper, the wgmma kernel (12); both finish
    # tiles split between programs through the workspace.
    monkeypatch.setitem(NAMED_SHAPES, "small-llama", LlamaConfig(32000, 2048, 5632, 4, 16, 4))
    if len(lengths) > 8 and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma kernel is Hopper's")
    expected_kernel = SkinnyConfig if len(lengths) <= 8 else WgmmaConfig
    assert isinstance(kernel_config(len(lengths), 128, 2048), expected_kernel)

    def decode_logits(dependent: bool) -> torch.Tensor:
        monkeypatch.setattr(kernels, "DEPENDENT_LAUNCH", dependent)
        runner = ModelRunner(RunnerConfig("cuda", "bfloat16", 16, 4096, max_context_tokens=1024, quantize="int4"),
                             shape="small-llama")
        seqs = prefilled_for_decode(runner, lengths, seed=3, next_token=11)
        runner._decode_with_graph(seqs, None)  # captures
        poison_allocator()
        return runner._decode_with_graph(seqs, None)[0].clone()

    # Stream-K adds partial sums with atomics in the order programs finish, so two runs differ in
    # bf16 rounding (5e-3 measured); a read of stale activations is an error of order 1.
    assert relative_error(decode_logits(True), decode_logits(False)) < 2e-2


@pytest.mark.parametrize("graphs", ["captured", "eager", "alternating"])
def test_decode_steps_launched_ahead_give_the_step_by_step_tokens(graphs, monkeypatch):
    """step_loop.py on the GPU: each step launched ahead takes the previous step's tokens on the
    device: a captured step from its own previous replay, an eager one from the argmax of the
    step before, and (alternating) a captured step after an eager one by a copy; dense bf16
    weights (cuBLAS: the same sums in every run), lengths that cross KV blocks while steps run
    ahead."""
    from engines.base import SamplingParams
    from engines.native.model_runner import ModelRunner, RunnerConfig
    from tests.engines.native_steps import run_to_the_end

    runner = ModelRunner(RunnerConfig("cuda", "bfloat16", 16, 8192, cuda_graphs=graphs != "eager",
                                      max_context_tokens=1024), shape="smollm2-135m")
    if graphs == "alternating":
        calls = iter(range(10 ** 6))
        serves = runner._graph_serves
        monkeypatch.setattr(runner, "_graph_serves", lambda seqs, ahead: next(calls) % 2 == 0 and serves(seqs, ahead))
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 49152, (n,), generator=generator).tolist() for n in (5, 30, 17)]
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (20, 33, 40)]
    expected, _ = run_to_the_end(runner, prompts, params, run_ahead=False)
    ahead, loop = run_to_the_end(runner, prompts, params, run_ahead=True)
    assert ahead == expected
    assert loop.steps_ahead >= 25


@pytest.mark.parametrize("graphs", ["captured", "eager"])
def test_a_sequence_whose_logits_turn_nan_is_failed_while_its_batch_goes_on(graphs, monkeypatch):
    """A NaN row of the embedding table, read by one sequence's decode step: that step answers
    NAN_LOGITS for it (the argmax kernel), the step launched ahead of it reads row 0 for it and is
    thrown away, the sequence is failed; the others get their tokens. Dense bf16 weights (a
    NaN stays a NaN; INT4's fixed-point cells clamp it), an untied LM head (else the NaN row would
    be every sequence's logit)."""
    from engines.base import SamplingParams
    from engines.native.model import NAMED_SHAPES, LlamaConfig
    from engines.native.model_runner import ModelRunner, RunnerConfig
    from engines.native.sequence import NAN_LOGITS
    from engines.native.step_loop import NAN_FAILURE
    from tests.engines.native_steps import run_to_the_end, token_only_in

    monkeypatch.setitem(NAMED_SHAPES, "small-llama", LlamaConfig(32000, 1024, 2816, 2, 8, 4))
    runner = ModelRunner(RunnerConfig("cuda", "bfloat16", 16, 8192, cuda_graphs=graphs == "captured",
                                      max_context_tokens=1024), shape="small-llama")
    generator = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 32000, (n,), generator=generator).tolist() for n in (5, 30, 17)]
    params = [SamplingParams(max_tokens=24, temperature=0.0)] * 3
    expected, _ = run_to_the_end(runner, prompts, params, run_ahead=False)
    others = prompts + [expected["s0"][0], expected["s2"][0], expected["s1"][0][:6]]
    poisoned = token_only_in(expected["s1"][0][6:], others)  # read by s1's later steps alone
    cut = expected["s1"][0].index(poisoned) + 1
    table = runner.model.embed_tokens.weight
    row = table[poisoned].clone()
    table[poisoned] = float("nan")  # in place: a captured step reads the table where it was
    outputs, loop = run_to_the_end(runner, prompts, params, run_ahead=True)
    table[poisoned] = row
    assert outputs["s1"] == (expected["s1"][0][:cut] + [NAN_LOGITS], NAN_FAILURE)
    assert outputs["s0"] == expected["s0"] and outputs["s2"] == expected["s2"]
    assert loop.steps_ahead > 0
