"""W4A16 matmul for up to 16 input rows (decode; int4_kernels picks it up to 8), in Gluon: Triton
with the register layouts spelled out.

Why a second tensor-core kernel: at batch 1 the tile kernel in int4_kernels.py ran at about
half the speed of merely reading its weights. Triton chose the layouts there, and the unpacked
weights went through shared memory on their way to the tensor cores (a 32 KB round trip per
8 KB of weights), with a wait after each of a group's eight dots. Here the packed words are
loaded straight into the registers where `mma.sync` wants its first operand, so unpacking
happens in place and nothing passes through shared memory:

- lowbit's format (quantization.py) puts value j of consecutive words on consecutive inputs,
  so value j of a [rows, 16-word] tile is a 16-input slice of a group: one m16n8k16 operand.
  The words are loaded in that operand's own layout (`DotOperandLayout`, two consecutive
  words a thread), and one inline-PTX block turns two words into eight bf16 pairs;
- each pair is 128 + q made exact in bf16, minus 128 + z (the group's zero point), so the
  tensor cores see the exact integers q - z; the group's fp32 sum is then multiplied by its
  scale (exact to fp32 rounding, like the reference);
- everything a group needs (words, zero points, scales, x) is loaded before the group before it
  is multiplied, so loads are in flight while the tensor cores work (a deeper ring of words in
  shared memory through cp.async measured slower: benchmarks/results, session 5);
- split K as in the tile kernel: partial sums added into a workspace with atomics, the last
  program of a tile (arrival counter) finishes it and leaves workspace and counter at zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

MAX_ROWS = 16  # x is one [16, BLOCK_M <= 16] MMA operand
GROUP = gl.constexpr(128)  # inputs per quantization group: the kernel's K step
WORDS = gl.constexpr(16)  # int32 words per group


@dataclass(frozen=True)
class SkinnyConfig:  # one program per (BLOCK_N outputs, K slice); all rows (<= 16) in one program
    block_n: int  # a multiple of 16 * num_warps
    programs: int  # split K until about this many programs run
    num_warps: int


def block_m(rows: int) -> int:
    """The kernel's BLOCK_M for `rows` input rows: the MMA's n, 8 or 16."""
    return 8 if rows <= 8 else 16


@gluon.jit
def _exact_values(words, zero_pair):
    """Two words (consecutive inputs of one output row) -> eight bf16 pairs, pair j = value j of
    each word minus the group's zero point: q goes into the low mantissa bits of 128.0 (prmt,
    shift, lop3) and 128 + z is subtracted (`zero_pair` holds it twice), all exact in bf16."""
    return gl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 lo, hi, t, v;
        prmt.b32 lo, $8, $9, 0x5410;
        prmt.b32 hi, $8, $9, 0x7632;
        lop3.b32 v, lo, 0x000f000f, 0x43004300, 0xea;
        sub.rn.bf16x2 $0, v, $10;
        shr.u32 t, lo, 4;
        lop3.b32 v, t, 0x000f000f, 0x43004300, 0xea;
        sub.rn.bf16x2 $1, v, $10;
        shr.u32 t, lo, 8;
        lop3.b32 v, t, 0x000f000f, 0x43004300, 0xea;
        sub.rn.bf16x2 $2, v, $10;
        shr.u32 t, lo, 12;
        lop3.b32 v, t, 0x000f000f, 0x43004300, 0xea;
        sub.rn.bf16x2 $3, v, $10;
        lop3.b32 v, hi, 0x000f000f, 0x43004300, 0xea;
        sub.rn.bf16x2 $4, v, $10;
        shr.u32 t, hi, 4;
        lop3.b32 v, t, 0x000f000f, 0x43004300, 0xea;
        sub.rn.bf16x2 $5, v, $10;
        shr.u32 t, hi, 8;
        lop3.b32 v, t, 0x000f000f, 0x43004300, 0xea;
        sub.rn.bf16x2 $6, v, $10;
        shr.u32 t, hi, 12;
        lop3.b32 v, t, 0x000f000f, 0x43004300, 0xea;
        sub.rn.bf16x2 $7, v, $10;
        }
        """,
        constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r",
        args=[words, zero_pair], dtype=(gl.bfloat16,) * 8, is_pure=True, pack=2)


@gluon.jit
def _group_words(q_ptr, rows_a, in_n, word_ids, group, stride_q):
    """A group's packed words [BLOCK_N, 16], loaded in the first MMA operand's layout (rows
    outside the weight read as 0)."""
    return gl.load(q_ptr + rows_a[:, None] * stride_q + group * WORDS + word_ids[None, :], mask=in_n[:, None],
                   other=0, eviction_policy="evict_first")


@gluon.jit
def _group_inputs(x_rows, x_mask, k_ids, group):
    """x for one group, as eight [16, BLOCK_M] second operands: value j of word w is input
    64 (w // 8) + 8 j + w % 8 of the group."""
    x = ()
    for j in gl.static_range(8):
        inputs = gl.max_contiguous(gl.multiple_of(group * GROUP + (k_ids // 8) * 64 + j * 8 + k_ids % 8, 8), 8)
        x = x + (gl.load(x_rows + inputs[:, None], mask=x_mask, other=0.0),)
    return x


@gluon.jit
def _group_scales(s_ptr, z_ptr, rows_a, in_n, cols, mask_n, group, stride_s):
    """A group's zero points as bf16 pairs (128 + z, twice; the first operand's rows) and its
    scales (the accumulator's rows)."""
    zero = gl.load(z_ptr + rows_a * stride_s + group, mask=in_n, other=0).to(gl.int32)
    scale = gl.load(s_ptr + cols * stride_s + group, mask=mask_n, other=0.0).to(gl.float32)
    return (zero | 0x4300) * 0x10001, scale


@gluon.jit
def _group_product(words, zero_pair, scale, x, MMA: gl.constexpr):
    """s sum over one group's 128 inputs of (q - z) x, fp32 [BLOCK_N, BLOCK_M]: eight m16n8k16
    products, one per value j of the words."""
    values = _exact_values(words, gl.broadcast(zero_pair[:, None], words)[0])
    product = gl.zeros((words.shape[0], x[0].shape[1]), gl.float32, MMA)
    for j in gl.static_range(8):
        product = mma_v2(values[j], x[j], product)
    return product * scale[:, None]


@gluon.jit
def _store_output(acc, up, out_ptr, residual_ptr, rows_m, mask_m, cols, mask_n, stride_om, stride_rm,
                  GATED: gl.constexpr, ADD_RESIDUAL: gl.constexpr):
    """The epilogue of a [BLOCK_N, BLOCK_M] tile (outputs by rows): silu(gate) * up, + residual, store."""
    if GATED:
        acc = acc / (1.0 + gl.exp(-acc)) * up
    mask = mask_n[:, None] & mask_m[None, :]
    if ADD_RESIDUAL:
        acc += gl.load(residual_ptr + rows_m[None, :] * stride_rm + cols[:, None], mask=mask, other=0.0).to(gl.float32)
    gl.store(out_ptr + rows_m[None, :] * stride_om + cols[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def int4_skinny_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, residual_ptr, workspace_ptr, counters_ptr,
    M, N, groups, up_offset,  # N: outputs; groups: per K slice; gated: the up rows start at `up_offset`
    stride_xm, stride_om, stride_rm, stride_q, stride_s,
    BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, SPLIT_K: gl.constexpr, GATED: gl.constexpr,
    ADD_RESIDUAL: gl.constexpr,
):
    """One program per (BLOCK_N outputs, 1/SPLIT_K of K); the rows (M <= BLOCK_M) all at once."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, 8])
    A: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)  # weights [BLOCK_N, 16 words]
    B: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)  # x [16 inputs, BLOCK_M rows]
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    rows_a = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, A))
    in_n = rows_a < N  # gated: the up rows (+ N) are then inside too
    word_ids = gl.arange(0, WORDS, layout=gl.SliceLayout(0, A))
    k_ids = gl.arange(0, WORDS, layout=gl.SliceLayout(1, B))
    m_b = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, B))
    x_rows = x_ptr + m_b[None, :] * stride_xm
    x_mask = (m_b < M)[None, :]
    cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    rows_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
    mask_n = cols < N
    mask_m = rows_m < M

    # Everything a group needs is loaded one group ahead (the last group reloads itself: L2
    # hits), so that loads are in flight while the tensor cores work on the group before.
    first = pid_k * groups
    last = first + groups - 1
    words = _group_words(q_ptr, rows_a, in_n, word_ids, first, stride_q)
    zero_pair, scale = _group_scales(s_ptr, z_ptr, rows_a, in_n, cols, mask_n, first, stride_s)
    up_words, up_zero_pair, up_scale = words, zero_pair, scale
    if GATED:
        up_words = _group_words(q_ptr, rows_a + up_offset, in_n, word_ids, first, stride_q)
        up_zero_pair, up_scale = _group_scales(s_ptr, z_ptr, rows_a + up_offset, in_n, cols + up_offset, mask_n,
                                               first, stride_s)
    x = _group_inputs(x_rows, x_mask, k_ids, first)
    acc = gl.zeros((BLOCK_N, BLOCK_M), gl.float32, MMA)
    up = gl.zeros((BLOCK_N, BLOCK_M), gl.float32, MMA)
    for group in range(first, first + groups):
        following = gl.minimum(group + 1, last)
        next_words = _group_words(q_ptr, rows_a, in_n, word_ids, following, stride_q)
        next_zero_pair, next_scale = _group_scales(s_ptr, z_ptr, rows_a, in_n, cols, mask_n, following, stride_s)
        next_x = _group_inputs(x_rows, x_mask, k_ids, following)
        if GATED:
            next_up_words = _group_words(q_ptr, rows_a + up_offset, in_n, word_ids, following, stride_q)
            next_up_zero_pair, next_up_scale = _group_scales(s_ptr, z_ptr, rows_a + up_offset, in_n,
                                                             cols + up_offset, mask_n, following, stride_s)
            up += _group_product(up_words, up_zero_pair, up_scale, x, MMA)
            up_words, up_zero_pair, up_scale = next_up_words, next_up_zero_pair, next_up_scale
        acc += _group_product(words, zero_pair, scale, x, MMA)
        words, zero_pair, scale, x = next_words, next_zero_pair, next_scale, next_x

    if SPLIT_K == 1:
        _store_output(acc, up, out_ptr, residual_ptr, rows_m, mask_m, cols, mask_n, stride_om, stride_rm,
                      GATED, ADD_RESIDUAL)
    else:
        TILE_SIZE: gl.constexpr = BLOCK_N * BLOCK_M
        local = (gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))[:, None] * BLOCK_M
                 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))[None, :])
        partials = workspace_ptr + pid_n * (2 * TILE_SIZE if GATED else TILE_SIZE) + local
        valid = mask_n[:, None] & mask_m[None, :]  # at one input row, 7 of the tile's 8 columns are padding
        gl.atomic_add(partials, acc, mask=valid, sem="relaxed")
        if GATED:
            gl.atomic_add(partials + TILE_SIZE, up, mask=valid, sem="relaxed")
        gl.thread_barrier()  # every thread's partial sums are in before the counter moves
        arrived = gl.atomic_add(counters_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last K slice of this tile: finish it
            gl.thread_barrier()
            acc = gl.load(partials, mask=valid, other=0.0, cache_modifier=".cg")  # from L2, where the atomics landed
            gl.store(partials, gl.zeros((BLOCK_N, BLOCK_M), gl.float32, MMA), mask=valid)
            if GATED:
                up = gl.load(partials + TILE_SIZE, mask=valid, other=0.0, cache_modifier=".cg")
                gl.store(partials + TILE_SIZE, gl.zeros((BLOCK_N, BLOCK_M), gl.float32, MMA), mask=valid)
            gl.store(counters_ptr + pid_n, 0)
            _store_output(acc, up, out_ptr, residual_ptr, rows_m, mask_m, cols, mask_n, stride_om, stride_rm,
                          GATED, ADD_RESIDUAL)
