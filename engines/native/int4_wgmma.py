"""W4A16 matmul on Hopper's warpgroup tensor cores (wgmma) for decode batches of 9 to 128 bf16
rows, in Gluon.

Why a third kernel: at 64 rows the tile kernel in int4_kernels.py (mma.sync, each group's
partial product scaled before the next group starts) reached about 130 TFLOPS and was slower
than bf16 cuBLAS (one Llama-3-8B layer 216 us against 172-187, session 10), while at that
size a W4A16 matmul reads a quarter of bf16's bytes. Here:

- the weights are the first operand and come from registers (the product is computed
  transposed, out^T = W x^T, so that the few input rows are wgmma's N): a group's words are
  loaded in that operand's layout and turned in place into bf16 weights (q - z) s by one
  inline-PTX block per two words (FOLD_ASM: int4_skinny's unpack, then two bf16x2 FMAs; the
  difference is exact and the product rounded once, as dequantize-then-cuBLAS rounds it);
- with the scales in the weights, every group's eight K = 16 products accumulate into one
  fp32 accumulator asynchronously: no per-group partial sum to wait for and rescale;
- x is the second operand, from shared memory: per group [8 (value j), BLOCK_M, 16 (word w)],
  value j of word w being input 64 (w // 8) + 8 j + w % 8 (quantization.py's interleave), in
  two buffers used in turn: the next group's words and x (an L2 hit; or the one after's,
  X_AHEAD) are loaded while the tensor cores work on this group;
- gated (gate/up): a tile's BLOCK_N rows are BLOCK_N / 2 gate rows, then the matching up rows,
  so one accumulator holds both and the epilogue pairs them through shared memory;
- RING > 0: the words, scales and zero points come through a ring of RING groups in shared
  memory that cp.async fills RING - 1 groups ahead, instead of one group ahead in registers.
  What that buys is registers: Llama-3-8B gate/up at 128 rows fits 256-row tiles with it
  (143 -> 113 us, session 12); the deeper prefetch itself gained nothing at 16-64 rows;
- split K as in the tile kernel: a tile's K slices add into a workspace and the program whose
  groups complete it runs the epilogue (int4_skinny._finish_tile).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engines.native.int4_skinny import TILE_ROWS, _finish_tile, tiled_row_starts

MAX_ROWS = 128  # the rows are wgmma's N (at most 256), held in one accumulator
WORDS = gl.constexpr(16)  # int32 words per group of 128 inputs


def _fold_asm() -> str:
    """Two words (consecutive inputs of one output row, or of two rows: the block is elementwise)
    -> eight bf16 pairs (q - z) s, pair j holding value j of each word. Inputs after the eight
    outputs: the two words, then bf16 pairs of -(128 + z) and of s."""
    lines = ["{", ".reg .b32 lo, hi, t, v, one, minus_zero;", "mov.b32 one, 0x3f803f80;",
             "mov.b32 minus_zero, 0x80008000;", "prmt.b32 lo, $8, $9, 0x5410;", "prmt.b32 hi, $8, $9, 0x7632;"]
    for j in range(8):
        half = "lo" if j < 4 else "hi"
        shift = 4 * (j % 4)
        if shift:
            lines.append(f"shr.u32 t, {half}, {shift};")
        source = "t" if shift else half
        lines += [f"lop3.b32 v, {source}, 0x000f000f, 0x43004300, 0xea;",  # bf16 128 + q
                  "fma.rn.bf16x2 v, v, one, $10;",  # q - z: exact
                  f"fma.rn.bf16x2 ${j}, v, $11, minus_zero;"]  # (q - z) s, rounded once
    return "\n".join(lines + ["}"])


FOLD_ASM = gl.constexpr(_fold_asm())


@gluon.jit
def _weights(words, scale, zero):
    """[BLOCK_N, 16] words in the first operand's layout -> eight bf16 tensors, (q_j - z) s."""
    offset = (-(zero.to(gl.float32) + 128.0)).to(gl.bfloat16)
    return gl.inline_asm_elementwise(asm=FOLD_ASM, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r",
                                     args=[words, offset[:, None], scale.to(gl.bfloat16)[:, None]],
                                     dtype=(gl.bfloat16,) * 8, is_pure=True, pack=2)


@gluon.jit
def _group_loads(word_ptrs, scale_ptrs, zero_ptrs, group, mask, stride_sg, GROUP_STEP: gl.constexpr):
    """One group's words [BLOCK_N, 16], scales and zero points (masked-out rows: undefined);
    GROUP_STEP: words from a group of a row to the next."""
    words = gl.load(word_ptrs + group * GROUP_STEP, mask=mask[:, None], eviction_policy="evict_first")
    scale = gl.load(scale_ptrs + group * stride_sg, mask=mask, other=0.0)
    zero = gl.load(zero_ptrs + group * stride_sg, mask=mask, other=0)
    return words, scale, zero


@gluon.jit
def _word_pointers(q_ptr, tile, N, up_offset, stride_q, OUTPUTS: gl.constexpr, BLOCK_N: gl.constexpr,
                   L: gl.constexpr, TILED: gl.constexpr):
    """A tile's pointers [BLOCK_N, 16] in layout L to its first group's words (gated: the second
    half are the up rows, `up_offset` further), and its rows' validity [BLOCK_N] (past N: masked).
    TILED: the words are stored in blocks of TILE_ROWS rows x one group (quantization.py), and
    `stride_q` is the words of a row."""
    local = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, L))
    output = tile * OUTPUTS + local % OUTPUTS
    rows = output + (local // OUTPUTS) * up_offset
    if TILED:
        starts = tiled_row_starts(rows, stride_q)
    else:
        starts = rows * stride_q
    words = q_ptr + starts[:, None] + gl.arange(0, WORDS, layout=gl.SliceLayout(0, L))[None, :]
    return rows, words, output < N


@gluon.jit
def _ring_fill(rings, slot, word_ptrs, scale_ptrs, zero_ptrs, group, mask, group_mask, stride_sg,
               GROUP_STEP: gl.constexpr):
    """Start copying one group's words, scales and zero points into ring slot `slot` (one cp.async group)."""
    words, scales, zeros = rings
    async_copy.async_copy_global_to_shared(words.index(slot), word_ptrs + group * GROUP_STEP, mask=mask,
                                           eviction_policy="evict_first")
    async_copy.async_copy_global_to_shared(scales.index(slot), scale_ptrs + group * stride_sg, mask=group_mask)
    async_copy.async_copy_global_to_shared(zeros.index(slot), zero_ptrs + group * stride_sg, mask=group_mask)
    async_copy.commit_group()


@gluon.jit
def _ring_read(rings, slot, A: gl.constexpr, BLOCK_N: gl.constexpr):
    """One group's words [BLOCK_N, 16] (the first operand's layout), scales and zero points from the ring."""
    words, scales, zeros = rings
    FLAT: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    scale = scales.index(slot)._reinterpret(scales.dtype, [BLOCK_N], FLAT).load(gl.SliceLayout(1, A))
    zero = zeros.index(slot)._reinterpret(zeros.dtype, [BLOCK_N], FLAT).load(gl.SliceLayout(1, A))
    return words.index(slot).load(A), scale, zero


@gluon.jit
def int4_wgmma_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, residual_ptr, workspace_ptr, counters_ptr,
    M, N, groups, splits, up_offset,  # N: outputs; K in `splits` slices; gated: the up rows start at `up_offset`
    stride_xm, stride_om, stride_rm, stride_q, stride_s, stride_sg,
    BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
    GATED: gl.constexpr, ADD_RESIDUAL: gl.constexpr, X_AHEAD: gl.constexpr, RING: gl.constexpr,
    DEPENDENT: gl.constexpr, TILED: gl.constexpr = False,
):
    """One program per (tile of BLOCK_N weight rows, K slice); all M <= BLOCK_M rows at once.
    RING > 0 needs scales and zero points stored group by group (stride_s = 1)."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    A: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
    OUTPUTS: gl.constexpr = BLOCK_N // 2 if GATED else BLOCK_N  # outputs per tile
    GROUP_STEP: gl.constexpr = TILE_ROWS * WORDS if TILED else WORDS  # words from a group of a row to the next
    tile = gl.program_id(0)
    split = gl.program_id(1)
    first = split * groups // splits
    last = (split + 1) * groups // splits  # exclusive

    if RING:
        # cp.async copies 16-byte rows of 4 words and 8 consecutive scales (zero points) of each
        # half of the tile (gated: gate rows, then up rows); the first RING - 1 groups start now.
        WL: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [gl.num_warps(), 1], [1, 0])
        HALVES: gl.constexpr = 2 if GATED else 1
        SPAN: gl.constexpr = min(OUTPUTS // 8, 32)  # threads along a half's outputs
        SL: gl.constexpr = gl.BlockedLayout([1, 8], [32 // SPAN, SPAN], [1, gl.num_warps()], [1, 0])
        _, ring_word_ptrs, ring_valid = _word_pointers(q_ptr, tile, N, up_offset, stride_q, OUTPUTS, BLOCK_N, WL, TILED)
        ring_valid = ring_valid[:, None]
        half = gl.arange(0, HALVES, layout=gl.SliceLayout(1, SL))
        half_output = tile * OUTPUTS + gl.arange(0, OUTPUTS, layout=gl.SliceLayout(0, SL))
        ring_rows = half_output[None, :] + (half * up_offset)[:, None]  # stride_s = 1
        ring_scale_ptrs = s_ptr + ring_rows
        ring_zero_ptrs = z_ptr + ring_rows
        ring_group_valid = (half_output < N)[None, :] & (half < HALVES)[:, None]
        FLAT: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        rings = (gl.allocate_shared_memory(gl.int32, [RING, BLOCK_N, WORDS], gl.SwizzledSharedLayout(4, 1, 4, [1, 0])),
                 gl.allocate_shared_memory(s_ptr.dtype.element_ty, [RING, HALVES, OUTPUTS], FLAT),
                 gl.allocate_shared_memory(z_ptr.dtype.element_ty, [RING, HALVES, OUTPUTS], FLAT))
        for slot in gl.static_range(RING - 1):
            _ring_fill(rings, slot, ring_word_ptrs, ring_scale_ptrs, ring_zero_ptrs, first + slot,
                       ring_valid & (first + slot < last), ring_group_valid & (first + slot < last), stride_sg,
                       GROUP_STEP)
    else:
        rows, word_ptrs, valid = _word_pointers(q_ptr, tile, N, up_offset, stride_q, OUTPUTS, BLOCK_N, A, TILED)
        scale_ptrs = s_ptr + rows * stride_s
        zero_ptrs = z_ptr + rows * stride_s
        loads = _group_loads(word_ptrs, scale_ptrs, zero_ptrs, first, valid, stride_sg, GROUP_STEP)
    if DEPENDENT:  # dependent launch (kernels.py): the first weights load while the kernel before ends
        gdc_wait()
        gdc_launch_dependents()

    # x of one group as [8 (value j), BLOCK_M, 16 (word w)]: input 64 (w // 8) + 8 j + w % 8.
    X: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 16, 2], [gl.num_warps(), 1, 1], [2, 1, 0])
    j = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, X)))
    m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, gl.SliceLayout(2, X)))
    w = gl.arange(0, WORDS, layout=gl.SliceLayout(0, gl.SliceLayout(1, X)))
    x_ptrs = (x_ptr + m[None, :, None] * stride_xm + (j * 8)[:, None, None]
              + ((w // 8) * 64 + w % 8)[None, None, :])
    x_mask = (m < M)[None, :, None]  # the loads broadcast it over j and w
    XS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, WORDS], gl.bfloat16)
    staged = gl.allocate_shared_memory(gl.bfloat16, [2, 8 * BLOCK_M, WORDS], XS)  # value j: rows j BLOCK_M ..
    staged.index(0).store(gl.load(x_ptrs + first * 128, mask=x_mask, other=0.0).reshape([8 * BLOCK_M, WORDS]))
    fence_async_shared()
    if RING:
        async_copy.wait_group(RING - 2)  # the first group's copies are in (the barrier shows them to every thread)
    gl.thread_barrier()

    # Each step: load the next group's words and a later group's x, make this group's weights,
    # start its products, stage the next group's x in the other buffer, wait for the products.
    # X_AHEAD = 2 loads x two groups ahead (a whole step to arrive instead of part of one): faster
    # where registers are to spare (128-row tiles of 8 warps: Llama-3-8B down at 16 / 128 rows
    # 21.4 -> 19.0 / 80.5 -> 72.9 us), slower elsewhere (256-row gate/up at 64 rows 66.1 -> 69.7).
    acc = gl.zeros((BLOCK_N, BLOCK_M), gl.float32, MMA)
    stage = 0
    if X_AHEAD == 2:
        ahead = gl.load(x_ptrs + (first + 1) * 128, mask=x_mask & (first + 1 < last), other=0.0)
    slot = 0  # RING: this group's slot in the ring
    for group in range(first, last):
        if RING:  # refill the slot the previous group used (every thread has read it: the last barrier)
            _ring_fill(rings, gl.where(slot == 0, RING - 1, slot - 1), ring_word_ptrs, ring_scale_ptrs,
                       ring_zero_ptrs, group + RING - 1, ring_valid & (group + RING - 1 < last),
                       ring_group_valid & (group + RING - 1 < last), stride_sg, GROUP_STEP)
            loads = _ring_read(rings, slot, A, BLOCK_N)
        else:
            fetched = _group_loads(word_ptrs, scale_ptrs, zero_ptrs, group + 1, valid & (group + 1 < last),
                                   stride_sg, GROUP_STEP)
        later = gl.load(x_ptrs + (group + X_AHEAD) * 128, mask=x_mask & (group + X_AHEAD < last), other=0.0)
        weights = _weights(loads[0], loads[1], loads[2])
        current = staged.index(stage)
        for jj in gl.static_range(8):
            acc = warpgroup_mma(weights[jj], current.slice(jj * BLOCK_M, BLOCK_M).permute((1, 0)), acc, is_async=True)
        # The other buffer was read by the previous group's products, finished below last time.
        staged.index(1 - stage).store((ahead if X_AHEAD == 2 else later).reshape([8 * BLOCK_M, WORDS]))
        fence_async_shared()
        if RING:
            async_copy.wait_group(RING - 2)  # the next group's copies are in
        gl.thread_barrier()
        # Waiting here rather than one group later (with the next group's weights made while these
        # products run) measured faster: that version needs 255 registers at 256-row tiles
        # (Llama-3-8B gate/up at 64 rows: 65 against 82 us, session 11).
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ) + weights)[0]
        if X_AHEAD == 2:
            ahead = later
        if RING:
            slot = gl.where(slot == RING - 1, 0, slot + 1)
        else:
            loads = fetched
        stage = 1 - stage

    if GATED:  # pair gate row i with up row i: through shared memory into one layout
        E: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [gl.num_warps(), 1], [1, 0])
        pair = gl.allocate_shared_memory(gl.float32, [BLOCK_N, BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        pair.store(acc)
        gl.thread_barrier()
        gate = pair.slice(0, OUTPUTS).load(E)
        up = pair.slice(OUTPUTS, OUTPUTS).load(E)
        rows_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, E))
        _finish_tile(gate, up, gl.full((BLOCK_M, ), 1.0, gl.float32, gl.SliceLayout(0, E)), tile, last - first,
                     out_ptr, residual_ptr, workspace_ptr, counters_ptr, rows_m, rows_m < M,
                     gl.arange(0, OUTPUTS, layout=gl.SliceLayout(1, E)), N, groups, stride_om, stride_rm,
                     OUTPUTS, BLOCK_M, GATED, ADD_RESIDUAL, E)
    else:
        rows_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
        _finish_tile(acc, acc, gl.full((BLOCK_M, ), 1.0, gl.float32, gl.SliceLayout(0, MMA)), tile, last - first,
                     out_ptr, residual_ptr, workspace_ptr, counters_ptr, rows_m, rows_m < M,
                     gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA)), N, groups, stride_om, stride_rm,
                     BLOCK_N, BLOCK_M, GATED, ADD_RESIDUAL, MMA)
