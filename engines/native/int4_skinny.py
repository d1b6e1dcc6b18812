"""W4A16 matmul for up to 16 input rows (decode; int4_kernels picks it up to 8), in Gluon: Triton
with the register layouts spelled out.

Why a second tensor-core kernel: at batch 1 the tile kernel in int4_kernels.py ran at about
half the speed of merely reading its weights. Here the packed words are loaded straight into
the registers where `mma.sync` wants its first operand, so unpacking happens in place:

- lowbit's format (quantization.py) puts value j of consecutive words on consecutive inputs,
  so value j of a [rows, 16-word] tile is a 16-input slice of a group: one m16n8k16 operand.
  The words are loaded in that operand's own layout (`DotOperandLayout`, two consecutive
  words a thread), and one inline-PTX block (UNPACK_ASM) turns two words into eight bf16
  pairs of 128 + q, exact in bf16;
- the zero point goes on the group's sum rather than on every weight: s x . (q - z) =
  s (x . (128 + q) - (128 + z) sum x), with sum x per group computed once per program
  (session 6: a third fewer instructions than subtracting 128 + z from every pair);
- x is staged once per program in shared memory, already in the order the MMAs read it
  (ldmatrix), with those per-group sums; RMSNorm's weight is applied there and its 1 / rms
  on the finished sums, so the norm needs no kernel of its own (up to NORM_ROWS rows);
- stream-K: the work is (tile of BLOCK_N outputs, group) units shared out evenly over a whole
  number of waves of programs; a tile split between programs is finished through a
  workspace with atomics, by the program whose groups complete it (a counter of groups), or
  (FIXED, at 1-2 rows) output by output through int64 fixed-point cells that count their own
  groups, so that no fence, counter or read-back ends a program (see FIXED_BITS);
- the next unit's words, scales and zero points are loaded while the tensor cores work on
  this one (two or three units ahead, and a cp.async ring in shared memory in session 5,
  measured slower): the first unit's before the dependent-launch wait, the second's while the
  prologue stages x.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engines.native.quantization import UNIT_ROWS

MAX_ROWS = 16  # x is one [16, BLOCK_M <= 16] MMA operand
GROUP = gl.constexpr(128)  # inputs per quantization group: the kernel's K step
WORDS = gl.constexpr(16)  # int32 words per group
TILE_ROWS = gl.constexpr(UNIT_ROWS)  # tiled words (quantization.py): blocks of TILE_ROWS rows x one group


@dataclass(frozen=True)
class SkinnyConfig:  # stream-K: the (tile, group) units shared out evenly; all rows (<= 16) in one program
    block_n: int  # outputs per tile, a multiple of 16 * num_warps
    programs: int  # programs resident at once (registers are capped to fit them): a multiple of the SM count
    num_warps: int
    waves: int = 1  # launch waves x programs (one a unit at most): the later ones go to the SMs that finish first


NORM_ROWS = 2  # RMSNorm fused for up to this many rows (each program reads them whole: registers)
NORM_MAX_WIDTH = 8192
MAX_STAGED_BYTES = 96 * 1024  # x for a program's groups, staged in shared memory


def block_m(rows: int) -> int:
    """The kernel's BLOCK_M for `rows` input rows: the MMA's n, 8 or 16."""
    return 8 if rows <= 8 else 16


def fuses_norm(rows: int, k: int) -> bool:
    """Whether the kernel can compute RMSNorm(x) itself for `rows` rows of width `k`."""
    return rows <= NORM_ROWS and triton.next_power_of_2(k) <= NORM_MAX_WIDTH


def staged_groups(units: int, programs: int, groups: int, rows: int) -> int:
    """How many groups of x one program stages (`rows` = BLOCK_M): its units visit consecutive
    groups (mod `groups`). Raises when they would not fit in MAX_STAGED_BYTES."""
    slots = triton.next_power_of_2(min(triton.cdiv(units, programs), groups))
    if slots * 8 * rows * WORDS * 2 > MAX_STAGED_BYTES:  # [8 values, rows, 16 words] bf16 a group
        raise ValueError(f"{programs} programs leave {slots} groups of x to each; more programs are needed")
    return slots


# q goes into the low mantissa bits of 128.0 (bf16 0x4300): two words (consecutive inputs of one
# output row) -> eight bf16 pairs of 128 + q, pair j holding value j of each word. A prmt
# gathers the two words' halves, then one shift and one lop3 per pair. Shared with the tile
# kernel in int4_kernels.py.
UNPACK_ASM = gl.constexpr("""
        {
        .reg .b32 lo, hi, t;
        prmt.b32 lo, $8, $9, 0x5410;
        prmt.b32 hi, $8, $9, 0x7632;
        lop3.b32 $0, lo, 0x000f000f, 0x43004300, 0xea;
        shr.u32 t, lo, 4;
        lop3.b32 $1, t, 0x000f000f, 0x43004300, 0xea;
        shr.u32 t, lo, 8;
        lop3.b32 $2, t, 0x000f000f, 0x43004300, 0xea;
        shr.u32 t, lo, 12;
        lop3.b32 $3, t, 0x000f000f, 0x43004300, 0xea;
        lop3.b32 $4, hi, 0x000f000f, 0x43004300, 0xea;
        shr.u32 t, hi, 4;
        lop3.b32 $5, t, 0x000f000f, 0x43004300, 0xea;
        shr.u32 t, hi, 8;
        lop3.b32 $6, t, 0x000f000f, 0x43004300, 0xea;
        shr.u32 t, hi, 12;
        lop3.b32 $7, t, 0x000f000f, 0x43004300, 0xea;
        }
        """)


@gluon.jit
def _offset_values(words):
    """[BLOCK_N, 16] words in the first operand's layout -> eight bf16 tensors, 128 + value j."""
    return gl.inline_asm_elementwise(asm=UNPACK_ASM, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r", args=[words],
                                     dtype=(gl.bfloat16,) * 8, is_pure=True, pack=2)


@gluon.jit
def tiled_row_starts(rows, stride_q):
    """Where each of `rows` (a row or a tensor of them) starts in tiled words (quantization.py: blocks
    of TILE_ROWS rows x one group, `stride_q` the words of a row): its block's, then its own 16 words."""
    return (rows // TILE_ROWS) * (TILE_ROWS * stride_q) + (rows % TILE_ROWS) * WORDS


@gluon.jit
def _unit_words(q_ptr, row, group, word_offsets, local_a, mask_a, stride_q, TILED: gl.constexpr,
                IN_BLOCK: gl.constexpr):
    """The words [BLOCK_N, 16] of rows `row` + `local_a`, group `group`. `word_offsets` are each
    thread's offsets from the unit's first word (loop invariant), row by row or TILED (quantization.py:
    blocks of TILE_ROWS rows x one group, `stride_q` the words of a row) when every unit's rows lie in
    one block (IN_BLOCK); otherwise tiled, each unit finds its rows' blocks (the word in the group in
    `word_offsets`). Per unit, that costs the step's loads their issue rate: a Llama-3-8B INT4
    batch-1 step took 2,285 us against 2,264 with IN_BLOCK (session 20)."""
    if TILED and IN_BLOCK:
        start = tiled_row_starts(row, stride_q) + group * (TILE_ROWS * WORDS)
        return gl.load(q_ptr + start + word_offsets, mask=mask_a, eviction_policy="evict_first")
    if TILED:
        starts = tiled_row_starts(row + local_a, stride_q) + group * (TILE_ROWS * WORDS)
        return gl.load(q_ptr + starts[:, None] + word_offsets, mask=mask_a, eviction_policy="evict_first")
    return gl.load(q_ptr + row * stride_q + group * WORDS + word_offsets, mask=mask_a, eviction_policy="evict_first")


@gluon.jit
def _unit_loads(q_ptr, s_ptr, z_ptr, word_offsets, scale_offsets, tile, group, valid, local_a, local_c, N,
                up_offset, stride_q, stride_s, stride_sg, BLOCK_N: gl.constexpr, GATED: gl.constexpr,
                TILED: gl.constexpr, IN_BLOCK: gl.constexpr):
    """A unit's words [BLOCK_N, 16] in the first operand's layout (`_unit_words`), its scales and
    its 128 + zero points (fp32, the accumulator's rows); gated, the up rows' too. `scale_offsets`
    are each thread's offsets from a tile's first row (loop invariant). Masked-out rows (past N,
    or all of them when not `valid`) are left undefined: they only reach outputs that are never
    stored."""
    mask_a = ((tile * BLOCK_N + local_a < N) & valid)[:, None]
    mask_c = (tile * BLOCK_N + local_c < N) & valid
    row = tile * BLOCK_N
    words = _unit_words(q_ptr, row, group, word_offsets, local_a, mask_a, stride_q, TILED, IN_BLOCK)
    scale = gl.load(s_ptr + row * stride_s + group * stride_sg + scale_offsets, mask=mask_c)
    zero = gl.load(z_ptr + row * stride_s + group * stride_sg + scale_offsets, mask=mask_c)
    loads = (words, scale, zero)
    if GATED:
        row += up_offset
        loads = loads + (_unit_words(q_ptr, row, group, word_offsets, local_a, mask_a, stride_q, TILED, IN_BLOCK),
                         gl.load(s_ptr + row * stride_s + group * stride_sg + scale_offsets, mask=mask_c),
                         gl.load(z_ptr + row * stride_s + group * stride_sg + scale_offsets, mask=mask_c))
    return loads


@gluon.jit
def _stamp(timeline_ptr, index, pid):
    """For benchmarks (TIMELINE): the global timer (ns) into timeline[pid, index]."""
    now = gl.inline_asm_elementwise(asm="mov.u64 $0, %globaltimer;", constraints="=l,r", args=[pid],
                                    dtype=gl.int64, is_pure=False, pack=1)
    gl.store(timeline_ptr + pid * 8 + index, now)


@gluon.jit
def _stamp_sm(timeline_ptr, pid):
    """For benchmarks (TIMELINE): the SM the program runs on into timeline[pid, 5]."""
    sm = gl.inline_asm_elementwise(asm="mov.u32 $0, %smid;", constraints="=r,r", args=[pid], dtype=gl.int32,
                                   is_pure=False, pack=1)
    gl.store(timeline_ptr + pid * 8 + 5, sm.to(gl.int64))


@gluon.jit
def _next_unit(tile, group, groups):
    """The (tile, group) after this one: the tile's next group, or the next tile's first."""
    end_of_tile = group == groups - 1
    return gl.where(end_of_tile, tile + 1, tile), gl.where(end_of_tile, 0, group + 1)


@gluon.jit
def _stage_inputs(x_ptr, norm_ptr, stride_xm, M, first_group, groups, staged, sums,
                  SLOTS: gl.constexpr, BLOCK_M: gl.constexpr, NORM: gl.constexpr):
    """x for the program's groups into shared memory, in the order the MMAs read it: slot s
    holds group (first_group + s) mod groups as [8 (value j), BLOCK_M, 16 (word w)] (rows
    8 s .. 8 s + 7 of `staged`), value j of word w being input 64 (w // 8) + 8 j + w % 8;
    and each slot's sum of x per row (for the zero points: x . (q - z) = x . (128 + q) -
    (128 + z) sum x). NORM: x times RMSNorm's
    weight (its 1 / rms goes on the finished sums). All loads at once: one L2 latency."""
    L: gl.constexpr = gl.BlockedLayout([1, 1, 1, 8], [1, 2, 8, 2], [gl.num_warps(), 1, 1, 1], [3, 2, 1, 0])
    slot = gl.arange(0, SLOTS, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L))))
    j = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L))))
    m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L))))
    w = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L))))
    group = (first_group + slot) % groups
    inputs = ((group * GROUP)[:, None, None, None] + (j * 8)[None, :, None, None]
              + ((w // 8) * 64 + w % 8)[None, None, None, :])
    mask = ((slot < groups)[:, None, None, None] & (m < M)[None, None, :, None])
    x = gl.load(x_ptr + m[None, None, :, None] * stride_xm + inputs, mask=mask, other=0.0)
    if NORM:
        x = x * gl.load(norm_ptr + inputs, mask=(slot < groups)[:, None, None, None], other=0.0)
    staged.store(x.reshape([SLOTS * 8 * BLOCK_M, 16]))
    sums.store(gl.sum(gl.sum(x.to(gl.float32), axis=3), axis=1))


@gluon.jit
def _inverse_rms(x_ptr, stride_xm, M, K, eps, m_ids, NORM_ROWS: gl.constexpr, NORM_BLOCK: gl.constexpr):
    """RMSNorm's 1 / rms of each input row, fp32 [BLOCK_M] in the layout of `m_ids` (1 past
    the first NORM_ROWS rows). Each program reads the whole rows from L2, all loads at once: one
    L2 latency per program instead of a kernel launch and a round trip through memory."""
    blocked: gl.constexpr = gl.BlockedLayout([8], [32], [gl.num_warps()], [0])
    inputs = gl.arange(0, NORM_BLOCK, layout=blocked)
    rows = ()
    for r in gl.static_range(NORM_ROWS):
        rows = rows + (gl.load(x_ptr + r * stride_xm + inputs, mask=(inputs < K) & (r < M), other=0.0),)
    inverse = m_ids.to(gl.float32) * 0.0 + 1.0
    for r in gl.static_range(NORM_ROWS):
        x = rows[r].to(gl.float32)
        inverse = gl.where(m_ids == r, 1.0 / gl.sqrt(gl.sum(x * x, axis=0) / K + eps), inverse)
    return inverse


@gluon.jit
def _unit_product(words, scale, zero, x, x_sum, MMA: gl.constexpr):
    """s sum over one group's 128 inputs of (q - z) x, fp32 [BLOCK_N, BLOCK_M]: eight m16n8k16
    products of 128 + q (exact in bf16) with x, one per value j of the words, then the zero
    point through the group's sum of x."""
    values = _offset_values(words)
    product = gl.zeros((words.shape[0], x[0].shape[1]), gl.float32, MMA)
    for j in gl.static_range(8):
        product = mma_v2(values[j], x[j], product)
    zero = zero.to(gl.float32) + 128.0
    return (product - zero[:, None] * x_sum[None, :]) * scale.to(gl.float32)[:, None]


@gluon.jit
def _silu_times(gate, up):
    return gate / (1.0 + gl.exp(-gate)) * up


@gluon.jit
def _store_output(acc, up, out_ptr, residual_ptr, rows_m, mask_m, cols, mask_n, stride_om, stride_rm,
                  GATED: gl.constexpr, ADD_RESIDUAL: gl.constexpr):
    """The epilogue of a [BLOCK_N, BLOCK_M] tile (outputs by rows): silu(gate) * up, + residual, store."""
    if GATED:
        acc = _silu_times(acc, up)
    mask = mask_n[:, None] & mask_m[None, :]
    if ADD_RESIDUAL:
        acc += gl.load(residual_ptr + rows_m[None, :] * stride_rm + cols[:, None], mask=mask, other=0.0).to(gl.float32)
    gl.store(out_ptr + rows_m[None, :] * stride_om + cols[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _finish_tile(acc, up, inverse_rms, tile, done, out_ptr, residual_ptr, workspace_ptr, counters_ptr, rows_m,
                 mask_m, local_c, N, groups, stride_om, stride_rm, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                 GATED: gl.constexpr, ADD_RESIDUAL: gl.constexpr, MMA: gl.constexpr):
    """A program's sums over `done` of a tile's `groups` groups: the output if that is all of
    them, else added into the tile's workspace; the program whose groups complete the tile
    (the counter counts groups) takes the sum, runs the epilogue and leaves workspace and
    counter at zero for the next call. `inverse_rms` (per row) scales the sums first."""
    acc *= inverse_rms[None, :]
    up *= inverse_rms[None, :]
    cols = tile * BLOCK_N + local_c
    mask_n = cols < N
    if done == groups:
        _store_output(acc, up, out_ptr, residual_ptr, rows_m, mask_m, cols, mask_n, stride_om, stride_rm,
                      GATED, ADD_RESIDUAL)
    else:
        TILE_SIZE: gl.constexpr = BLOCK_N * BLOCK_M
        partials = (workspace_ptr + tile * (2 * TILE_SIZE if GATED else TILE_SIZE) + local_c[:, None] * BLOCK_M
                    + rows_m[None, :])
        valid = mask_n[:, None] & mask_m[None, :]  # at one input row, 7 of the tile's 8 columns are padding
        gl.atomic_add(partials, acc, mask=valid, sem="relaxed")
        if GATED:
            gl.atomic_add(partials + TILE_SIZE, up, mask=valid, sem="relaxed")
        gl.thread_barrier()  # every thread's partial sums are in before the counter moves
        arrived = gl.atomic_add(counters_ptr + tile, done, sem="acq_rel")
        if arrived + done == groups:  # this program's groups complete the tile: finish it
            gl.thread_barrier()
            acc = gl.load(partials, mask=valid, other=0.0, cache_modifier=".cg")  # from L2, where the atomics landed
            gl.store(partials, gl.zeros((BLOCK_N, BLOCK_M), gl.float32, MMA), mask=valid)
            if GATED:
                up = gl.load(partials + TILE_SIZE, mask=valid, other=0.0, cache_modifier=".cg")
                gl.store(partials + TILE_SIZE, gl.zeros((BLOCK_N, BLOCK_M), gl.float32, MMA), mask=valid)
            gl.store(counters_ptr + tile, 0)
            _store_output(acc, up, out_ptr, residual_ptr, rows_m, mask_m, cols, mask_n, stride_om, stride_rm,
                          GATED, ADD_RESIDUAL)


# Fixed-point split-K (up to FIXED_ROWS input rows): a program's partial sum of an output goes into
# an int64 cell as sum * 2^FIXED_BITS (truncated) + (groups summed) * 2^COUNT_SHIFT, by one returning
# atomic add; the thread whose add brings the count to all of the tile's groups holds the whole
# sum and writes the output itself. One L2 round trip at a program's end instead of three (float
# atomics, a fence and a counter, then reading the sums back), and no barrier: in a Llama-3-8B
# batch-1 step, skipping the fix-up altogether saved 240 us of 2,556 (session 13). Integer adds
# are exact and commutative, so the result no longer depends on the programs' order. Range:
# |sum| < 2^(COUNT_SHIFT - 1 - FIXED_BITS) = 2^29; resolution 2^-24; up to 2^9 groups (K <= 65,536).
# Each partial sum is clamped to +-PARTIAL_LIMIT first (NaN to -PARTIAL_LIMIT: min and max return
# the operand that is a number), so that no input, however broken, can carry into the count. Without
# it a NaN input left a cell's count wrong and the next call's outputs wrong (session 14's GPU test),
# and a step with NaN activations hung the GPU (most likely a gated cell never whole, its thread spinning).
FIXED_BITS = gl.constexpr(24)
COUNT_SHIFT = gl.constexpr(54)
PARTIAL_LIMIT = gl.constexpr(float(2 ** 20 - 1))  # times the 2^9 partials a cell may take: below 2^29


@gluon.jit
def _fixed_add(cells, partial, done, mask):
    """Adds `partial` (fp32) for `done` groups into int64 cells: (the cells' new totals, their group counts)."""
    scale: gl.constexpr = float(2 ** FIXED_BITS)
    partial = gl.minimum(gl.maximum(partial, -PARTIAL_LIMIT), PARTIAL_LIMIT)
    mine = (partial * scale).to(gl.int64) + (done.to(gl.int64) << COUNT_SHIFT)
    total = gl.atomic_add(cells, mine, mask=mask, sem="relaxed") + mine
    return total, _fixed_count(total)


@gluon.jit
def _fixed_count(total):
    """The groups summed in a cell (its value, below 2^(COUNT_SHIFT - 1) in size, rounds away)."""
    return (total + (1 << (COUNT_SHIFT - 1))) >> COUNT_SHIFT


@gluon.jit
def _fixed_value(total, count):
    scale: gl.constexpr = float(2 ** FIXED_BITS)
    return (total - (count << COUNT_SHIFT)).to(gl.float32) * (1.0 / scale)


@gluon.jit
def _finish_tile_fixed(acc, up, inverse_rms, tile, done, out_ptr, residual_ptr, workspace_ptr, rows_m, mask_m,
                       local_c, N, groups, stride_om, stride_rm, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                       GATED: gl.constexpr, ADD_RESIDUAL: gl.constexpr):
    """A program's sums over `done` of a tile's `groups` groups: the output if that is all of
    them, else added into the tile's int64 cells in fixed point (see FIXED_BITS); the thread
    whose add completes a cell stores that output and leaves the cell at zero. Gated, the gate
    and up cells of an output complete apart: the thread that completes the up cell finishes,
    reading the gate cell again until it is whole (its last add is in flight from another program)."""
    acc *= inverse_rms[None, :]
    up *= inverse_rms[None, :]
    cols = tile * BLOCK_N + local_c
    mask = (cols < N)[:, None] & mask_m[None, :]  # at one input row, 7 of the tile's 8 columns are padding
    residual = gl.zeros_like(acc)
    if ADD_RESIDUAL:  # loaded before the atomics so that the round trips overlap
        residual = gl.load(residual_ptr + rows_m[None, :] * stride_rm + cols[:, None], mask=mask,
                           other=0.0).to(gl.float32)
    outputs = out_ptr + rows_m[None, :] * stride_om + cols[:, None]
    if done == groups:
        if GATED:
            acc = _silu_times(acc, up)
        gl.store(outputs, (acc + residual).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        TILE_SIZE: gl.constexpr = BLOCK_N * BLOCK_M
        cells = (workspace_ptr + tile * (2 * TILE_SIZE if GATED else TILE_SIZE) + local_c[:, None] * BLOCK_M
                 + rows_m[None, :])
        total, count = _fixed_add(cells, acc, done, mask)
        if GATED:
            up_total, up_count = _fixed_add(cells + TILE_SIZE, up, done, mask)
            complete = mask & (up_count == groups)
            pending = complete & (count != groups)
            while gl.max(gl.max(pending.to(gl.int32), axis=1), axis=0) > 0:
                again = gl.atomic_add(cells, gl.zeros_like(total), mask=pending, sem="relaxed")
                total = gl.where(pending, again, total)
                count = _fixed_count(total)
                pending = complete & (count != groups)
            value = _silu_times(_fixed_value(total, count), _fixed_value(up_total, up_count))
            gl.store(cells + TILE_SIZE, gl.zeros_like(total), mask=complete)
        else:
            complete = mask & (count == groups)
            value = _fixed_value(total, count)
        gl.store(outputs, (value + residual).to(out_ptr.dtype.element_ty), mask=complete)
        gl.store(cells, gl.zeros_like(total), mask=complete)


@gluon.jit
def _sum_unit(current, unit, last, tile, next_tile, acc, up, done, slot, staged, sums, inverse_rms, out_ptr,
              residual_ptr, workspace_ptr, counters_ptr, rows_m, mask_m, local_c, N, groups, stride_om, stride_rm, pid,
              timeline_ptr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, GATED: gl.constexpr,
              ADD_RESIDUAL: gl.constexpr, FIXED: gl.constexpr, TIMELINE: gl.constexpr, MMA: gl.constexpr,
              B: gl.constexpr):
    """One stream-K unit of the program, in `tile` (the next one's in `next_tile`): its products with
    x staged in `slot` added to the tile's sums, and the tile finished where the program's share of
    it ends. -> the carried state."""
    x = ()
    for j in gl.static_range(8):
        x = x + (staged.index(slot * 8 + j).permute((1, 0)).load(B),)
    x_sum = sums.index(slot).load(gl.SliceLayout(0, MMA))
    acc += _unit_product(current[0], current[1], current[2], x, x_sum, MMA)
    if GATED:
        up += _unit_product(current[3], current[4], current[5], x, x_sum, MMA)
    done += 1
    slot = gl.where(slot + 1 == groups, 0, slot + 1)  # past the last group, the program wraps to the first
    if (next_tile != tile) | (unit == last):  # the end of this program's share of the tile
        if TIMELINE:
            if unit == last:
                _stamp(timeline_ptr, 3, pid)
        if FIXED:
            _finish_tile_fixed(acc, up, inverse_rms, tile, done, out_ptr, residual_ptr, workspace_ptr, rows_m,
                               mask_m, local_c, N, groups, stride_om, stride_rm, BLOCK_N, BLOCK_M, GATED,
                               ADD_RESIDUAL)
        else:
            _finish_tile(acc, up, inverse_rms, tile, done, out_ptr, residual_ptr, workspace_ptr, counters_ptr,
                         rows_m, mask_m, local_c, N, groups, stride_om, stride_rm, BLOCK_N, BLOCK_M, GATED,
                         ADD_RESIDUAL, MMA)
        acc = gl.zeros((BLOCK_N, BLOCK_M), gl.float32, MMA)
        up = gl.zeros((BLOCK_N, BLOCK_M), gl.float32, MMA)
        done = 0
    return acc, up, done, slot


@gluon.jit
def int4_skinny_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, residual_ptr, workspace_ptr, counters_ptr, norm_ptr,
    M, N, K, groups, units, up_offset, eps,  # N: outputs; gated: the up rows start at `up_offset`
    stride_xm, stride_om, stride_rm, stride_q, stride_s, stride_sg,  # scales and zeros: by row, by group
    unit_row_stride,  # words from one row of a unit to the next: stride_q, or tiled, WORDS (see word_offsets)
    BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, SLOTS: gl.constexpr,
    GATED: gl.constexpr, ADD_RESIDUAL: gl.constexpr, NORM_ROWS: gl.constexpr, NORM_BLOCK: gl.constexpr,
    DEPENDENT: gl.constexpr, FIXED: gl.constexpr = False, TIMELINE: gl.constexpr = False, timeline_ptr=None,
    TILED: gl.constexpr = False, IN_BLOCK: gl.constexpr = False,
):
    """Stream-K: the work is `units` = (BLOCK_N-output tile, group) pairs, tile by tile, and
    program p takes units [p units / P, (p + 1) units / P) of the P programs, so every program
    reads the same number of words whatever the shape (whole waves, no tail); a tile that
    two programs share is finished through the workspace. All rows (M <= BLOCK_M) at once.
    NORM_ROWS > 0: the input is RMSNorm(x) with weight `norm_ptr` (M <= NORM_ROWS).
    TIMELINE (benchmarks/int4_timeline.py): each program stamps int64 [programs, 8] `timeline_ptr`
    at its start (0), after the wait (1), with x staged (2), with its last unit summed (3) and at
    its end (4), and the SM it runs on (5). TILED: the words are stored in blocks of TILE_ROWS rows x
    one group (quantization.py), and `stride_q` is the words of a row; IN_BLOCK: BLOCK_N divides
    TILE_ROWS and `up_offset`, so that every unit's rows lie in one block."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, 8])
    A: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)  # weights [BLOCK_N, 16 words]
    B: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)  # x [16 inputs, BLOCK_M rows]
    programs = gl.num_programs(0)
    pid = gl.program_id(0)
    if TIMELINE:
        _stamp(timeline_ptr, 0, pid)
        _stamp_sm(timeline_ptr, pid)
    first = pid * units // programs
    last = (pid + 1) * units // programs - 1
    first_group = first % groups

    # Each thread's offsets from a unit's first word: the same for every unit (loop invariant). Tiled
    # words' rows are WORDS apart, but passed at run time (`unit_row_stride`) rather than as that
    # constant: with the constant, ptxas addresses each thread's loads of a unit from one register
    # (immediate offsets) and schedules them differently, and a Llama-3-8B INT4 batch-1 step took
    # 2,257 us against 2,222 (session 21; same words, same process).
    local_a = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, A))
    word_cols = gl.arange(0, WORDS, layout=gl.SliceLayout(0, A))[None, :]
    if TILED and not IN_BLOCK:  # each unit finds its rows (_unit_words)
        word_offsets = word_cols
    else:
        word_offsets = local_a[:, None] * unit_row_stride + word_cols
    local_c = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    scale_offsets = local_c * stride_s
    rows_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
    mask_m = rows_m < M

    # The first unit's words, scales and zero points, then x for all of the program's groups;
    # from then on each step fetches the next unit's (none past the last) while the tensor
    # cores work on this one. (Two or three units ahead measured slower: session 6.)
    tile = first // groups
    group = first_group
    current = _unit_loads(q_ptr, s_ptr, z_ptr, word_offsets, scale_offsets, tile, group, first <= last, local_a,
                          local_c, N, up_offset, stride_q, stride_s, stride_sg, BLOCK_N, GATED,
                          TILED, IN_BLOCK)
    if DEPENDENT:  # dependent launch (kernels.py): these loads overlap the end of the kernel before
        gdc_wait()
        gdc_launch_dependents()
    if TIMELINE:
        _stamp(timeline_ptr, 1, pid)
    STAGED: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 1, [1, 0])
    staged = gl.allocate_shared_memory(gl.bfloat16, [SLOTS * 8 * BLOCK_M, WORDS], STAGED)
    SUMS: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    sums = gl.allocate_shared_memory(gl.float32, [SLOTS, BLOCK_M], SUMS)
    _stage_inputs(x_ptr, norm_ptr, stride_xm, M, first_group, groups, staged, sums, SLOTS, BLOCK_M, NORM_ROWS > 0)
    # The second unit's loads go out now, so that the weights stream through the rest of the
    # prologue (the norm's rows, the barrier) instead of only from the loop's first step; after the
    # wait, so that they take no bandwidth from the kernel before (session 9); after x's loads, so
    # that its registers are free (issued before x's, they cost spills and were no faster). Session
    # 17, Llama-3-8B INT4 batch-1 step: 2,463 -> 2,422 us.
    next_tile, next_group = _next_unit(tile, group, groups)
    fetched = _unit_loads(q_ptr, s_ptr, z_ptr, word_offsets, scale_offsets, next_tile, next_group, first < last,
                          local_a, local_c, N, up_offset, stride_q, stride_s, stride_sg, BLOCK_N, GATED,
                          TILED, IN_BLOCK)
    inverse_rms = gl.full((BLOCK_M,), 1.0, gl.float32, gl.SliceLayout(0, MMA))
    if NORM_ROWS > 0:
        inverse_rms = _inverse_rms(x_ptr, stride_xm, M, K, eps, rows_m, NORM_ROWS, NORM_BLOCK)
    gl.thread_barrier()  # the staged x is in
    staged = staged._reinterpret(gl.bfloat16, [SLOTS * 8, BLOCK_M, WORDS], STAGED)  # a [BLOCK_M, 16] tile a row
    sums = sums._reinterpret(gl.float32, [SLOTS, BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, [0]))  # a slot a row

    if TIMELINE:
        _stamp(timeline_ptr, 2, pid)
    acc = gl.zeros((BLOCK_N, BLOCK_M), gl.float32, MMA)
    up = gl.zeros((BLOCK_N, BLOCK_M), gl.float32, MMA)
    done = 0  # groups of the current tile summed in acc
    slot = 0
    # The first unit apart (every program has one: the launcher starts no more programs than units;
    # the second's loads are already out), then each step fetches the next unit's while the tensor
    # cores work on this one.
    acc, up, done, slot = _sum_unit(
        current, first, last, tile, next_tile, acc, up, done, slot, staged, sums, inverse_rms, out_ptr, residual_ptr,
        workspace_ptr, counters_ptr, rows_m, mask_m, local_c, N, groups, stride_om, stride_rm, pid, timeline_ptr,
        BLOCK_N, BLOCK_M, GATED, ADD_RESIDUAL, FIXED, TIMELINE, MMA, B)
    current = fetched
    tile, group = next_tile, next_group
    for unit in range(first + 1, last + 1):
        next_tile, next_group = _next_unit(tile, group, groups)
        fetched = _unit_loads(q_ptr, s_ptr, z_ptr, word_offsets, scale_offsets, next_tile, next_group, unit < last,
                              local_a, local_c, N, up_offset, stride_q, stride_s, stride_sg, BLOCK_N, GATED,
                              TILED, IN_BLOCK)
        acc, up, done, slot = _sum_unit(
            current, unit, last, tile, next_tile, acc, up, done, slot, staged, sums, inverse_rms, out_ptr,
            residual_ptr, workspace_ptr, counters_ptr, rows_m, mask_m, local_c, N, groups, stride_om, stride_rm, pid,
            timeline_ptr, BLOCK_N, BLOCK_M, GATED, ADD_RESIDUAL, FIXED, TIMELINE, MMA, B)
        current = fetched
        tile, group = next_tile, next_group
    if TIMELINE:
        _stamp(timeline_ptr, 4, pid)
