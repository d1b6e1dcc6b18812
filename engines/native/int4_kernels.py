"""W4A16 matmul in Triton: bf16/fp16 activations times lowbit's INT4 weights (see quantization.py).

Five paths, by the number of input rows M and the group size (`kernel_config`):
- groups of 64 (SmolLM2's K = 576), M <= GEMV_MAX_ROWS (8): a GEMV on CUDA cores that streams the packed words
  with many programs in flight;
- groups of 128, M <= 8, bf16: the skinny kernel in int4_skinny.py (Gluon, mma.sync with the
  words loaded into its operand registers);
- groups of 128, 8 < M <= 128, bf16, on Hopper: the wgmma kernel in int4_wgmma.py (Gluon,
  asynchronous warpgroup MMAs, the scales folded into the weights);
- M <= 128 otherwise: the tile kernel below, tensor cores, one quantization group per K step;
- more rows (prefill): dequantize to bf16 in one kernel, then cuBLAS (compute-bound there).
The GEMV and the tile kernel unpack value j of every word with a shift and an and-or that turns
the 4-bit q into the float 128 + q (q placed into the mantissa of 128.0: no int-to-float
conversion, which is a slow instruction), and apply each group's scale and zero point once per
output and group rather than per weight: x . ((q - z) s) = s (x . (128 + q) - (128 + z) sum(x)).
Epilogues: `residual` adds a tensor to the output (the residual stream); `gated` reads the
gate rows [0, N/2) and the up rows [N/2, N) and writes silu(gate) * up."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engines.native.carveout import share_decode_configuration
from engines.native.int4_skinny import MAX_ROWS as SKINNY_MAX_ROWS
from engines.native.int4_skinny import UNPACK_ASM, SkinnyConfig, fuses_norm, int4_skinny_kernel, staged_groups
from engines.native.int4_skinny import block_m as skinny_block_m
from engines.native.int4_wgmma import MAX_ROWS as WGMMA_MAX_ROWS
from engines.native.int4_wgmma import int4_wgmma_kernel
from engines.native.kernels import (INTERPRETED, SplitBuffers, dependent_launch, rms_norm, silu_and_mul, sm_count,
                                    wait_for_previous_kernel)
from engines.native.quantization import UNIT_ROWS, UNIT_WORDS, Int4Weight

TILE_ROWS = tl.constexpr(UNIT_ROWS)
TILE_WORDS = tl.constexpr(UNIT_WORDS)


@triton.jit
def _offset_values(packed, j: tl.constexpr):
    """The j-th 4-bit value q of each int32 word as the float32 128 + q: q goes into mantissa bits
    16..19 of 128.0 (one shift and one and-or), so no int-to-float conversion is needed, and
    the low 16 bits stay zero, so a cast to bf16/fp16 is exact."""
    if 4 * j <= 16:
        bits = (packed << (16 - 4 * j)) & 0xF0000
    else:
        bits = (packed >> (4 * j - 16)) & 0xF0000
    return (bits | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def _word_offsets(rows, words, stride_q, TILED: tl.constexpr):
    """Where word `words` (its index along a row) of weight row `rows` is, broadcast together: row
    by row (`stride_q` words apart), or TILED (quantization.py: blocks of TILE_ROWS rows x one group's
    TILE_WORDS words, group after group, `stride_q` = the words of a row)."""
    if TILED:
        return ((rows // TILE_ROWS) * (TILE_ROWS * stride_q) + (rows % TILE_ROWS) * TILE_WORDS
                + (words // TILE_WORDS) * (TILE_ROWS * TILE_WORDS) + words % TILE_WORDS)
    return rows * stride_q + words


@triton.jit
def _input_of(word_index, j: tl.constexpr):
    """The input (k) that value j of each word holds: words interleave in blocks of 8 (64 inputs)."""
    return (word_index // 8) * 64 + j * 8 + word_index % 8


@triton.jit
def _int4_gemv_tile(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, norm_ptr, row, cols, mask_n, K, stride_xm, stride_q,
                    stride_s, stride_sg, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    NORM: tl.constexpr, TILED: tl.constexpr):
    """sum_k x[row, k] W[cols, k] on CUDA cores, fp32 -> ([BLOCK_N], sum_k x[row, k]^2).

    NORM multiplies x by the RMSNorm weight as it loads (the 1 / rms factor, one number per
    row, is applied to the result by the caller: the program sees the whole row anyway).

    The step's words are a [BLOCK_N, groups, words per group] tile, so a group's scale and zero
    point are loaded once and broadcast over its words (loading them per word made the L1
    cache, not DRAM, the bottleneck: 72% L1 against 28% DRAM busy under ncu)."""
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    WORDS: tl.constexpr = GROUP // 8
    group_ids = tl.arange(0, GROUPS)
    step_words = group_ids[:, None] * WORDS + tl.arange(0, WORDS)[None, :]  # [GROUPS, WORDS]
    mask = mask_n[:, None, None]
    acc = tl.zeros((BLOCK_N, GROUPS, WORDS), tl.float32)
    squares = tl.zeros((GROUPS, WORDS), tl.float32)
    for k0 in range(0, K, BLOCK_K):  # BLOCK_K may exceed K (SmolLM2's 576 in one step): masked
        word_index = k0 // 8 + step_words
        in_k = word_index < K // 8  # [GROUPS, WORDS]
        packed = tl.load(qweight_ptr + _word_offsets(cols[:, None, None], word_index[None, :, :], stride_q, TILED),
                         mask=mask & in_k[None, :, :], other=0)
        group_index = k0 // GROUP + group_ids
        groups = cols[:, None] * stride_s + group_index[None, :] * stride_sg  # [BLOCK_N, GROUPS]
        group_mask = mask_n[:, None] & (group_index < K // GROUP)[None, :]
        scale = tl.load(scales_ptr + groups, mask=group_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + groups, mask=group_mask, other=0).to(tl.float32) + 128.0
        partial = tl.zeros((BLOCK_N, GROUPS, WORDS), tl.float32)
        x_sum = tl.zeros((GROUPS, WORDS), tl.float32)
        for j in tl.static_range(8):
            inputs = _input_of(word_index, j)
            x = tl.load(x_ptr + row * stride_xm + inputs, mask=in_k, other=0.0).to(tl.float32)
            if NORM:
                squares += x * x
                x *= tl.load(norm_ptr + inputs, mask=in_k, other=0.0).to(tl.float32)
            x_sum += x
            partial += _offset_values(packed, j) * x[None, :, :]
        # x . (q - z) s = s (x . (128 + q) - (128 + z) sum x)
        acc += scale[:, :, None] * (partial - zero[:, :, None] * x_sum[None, :, :])
    return tl.sum(tl.sum(acc, axis=2), axis=1), tl.sum(tl.sum(squares, axis=1), axis=0)


@triton.jit
def _int4_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, residual_ptr, norm_ptr,
    N, K, up_offset, stride_xm, stride_om, stride_rm, stride_q, stride_s, stride_sg, eps,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GATED: tl.constexpr, ADD_RESIDUAL: tl.constexpr, NORM: tl.constexpr, DEPENDENT: tl.constexpr,
    TILED: tl.constexpr,
):
    """NORM: the input is RMSNorm(x) with weight `norm_ptr`, computed here rather than by a
    kernel of its own (at batch 1 a small model's step is mostly launches)."""
    wait_for_previous_kernel(DEPENDENT)  # kernels.py: dependent launch
    row = tl.program_id(0)  # fastest-varying: the rows of one weight tile run together and share it in L2
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    out, squares = _int4_gemv_tile(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, norm_ptr, row, cols, mask_n, K,
                                   stride_xm, stride_q, stride_s, stride_sg, GROUP, BLOCK_N, BLOCK_K, NORM, TILED)
    inverse_rms = 1.0
    if NORM:  # on the finished sums
        inverse_rms = 1.0 / tl.sqrt(squares / K + eps)
    out *= inverse_rms
    if GATED:
        up, _ = _int4_gemv_tile(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, norm_ptr, row, cols + up_offset, mask_n,
                                K, stride_xm, stride_q, stride_s, stride_sg, GROUP, BLOCK_N, BLOCK_K, NORM, TILED)
        out = out * tl.sigmoid(out) * (up * inverse_rms)
    if ADD_RESIDUAL:
        out += tl.load(residual_ptr + row * stride_rm + cols, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, out.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _bf16_values(packed):
    """All eight 4-bit values q of each int32 word as bf16 128 + q, in one inline-asm block per
    two words (int4_skinny.UNPACK_ASM: about one integer instruction a value)."""
    return tl.inline_asm_elementwise(asm=UNPACK_ASM, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r", args=[packed],
                                     dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)


@triton.jit
def _values_as(packed, dtype: tl.constexpr, USE_ASM: tl.constexpr):
    """The eight values of each word, 128 + q, as a tuple of tensors in `dtype` (value j: input 8j + w)."""
    if USE_ASM:
        return _bf16_values(packed)
    return (_offset_values(packed, 0).to(dtype), _offset_values(packed, 1).to(dtype),
            _offset_values(packed, 2).to(dtype), _offset_values(packed, 3).to(dtype),
            _offset_values(packed, 4).to(dtype), _offset_values(packed, 5).to(dtype),
            _offset_values(packed, 6).to(dtype), _offset_values(packed, 7).to(dtype))


@triton.jit
def _load_group(qweight_ptr, cols, mask_n, group, stride_q, GROUP: tl.constexpr, TILED: tl.constexpr):
    """The words of one quantization group: [BLOCK_N, GROUP / 8] int32, read once (evict first)."""
    words = group * (GROUP // 8) + tl.arange(0, GROUP // 8)
    return tl.load(qweight_ptr + _word_offsets(cols[:, None], words[None, :], stride_q, TILED), mask=mask_n[:, None],
                   other=0,
                   eviction_policy="evict_first")


@triton.jit
def _int4_mma_group(acc, squares, packed, x_ptr, scales_ptr, zeros_ptr, norm_ptr, rows_m, mask_m, cols, mask_n,
                    group, stride_xm, stride_s, stride_sg, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, USE_ASM: tl.constexpr, NORM: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] += W[cols, group] . x[rows_m, group]^T on tensor cores.

    Weights first (W . x^T, the transpose of the product): the unpacked weights are made in
    registers, and Hopper's tensor cores take the first operand from registers; the small x
    tile is the one staged through shared memory. Eight dots per group, one per value j of
    the words, each over the group's GROUP / 8 words."""
    words = group * (GROUP // 8) + tl.arange(0, GROUP // 8)
    values = _values_as(packed, x_ptr.dtype.element_ty, USE_ASM)
    partial = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    x_sum = tl.zeros((BLOCK_M,), tl.float32)
    for j in tl.static_range(8):
        inputs = _input_of(words, j)
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + inputs[None, :], mask=mask_m[:, None],
                    other=0.0)  # [BLOCK_M, GROUP / 8]
        if NORM:  # RMSNorm's weight now, its 1 / rms (per row) on the finished sums
            squares += tl.sum(x.to(tl.float32) * x.to(tl.float32), axis=1)
            x = (x.to(tl.float32) * tl.load(norm_ptr + inputs).to(tl.float32)[None, :]).to(x.dtype)
        x_sum += tl.sum(x.to(tl.float32), axis=1)
        partial = tl.dot(values[j], tl.trans(x), partial)
    scale = tl.load(scales_ptr + cols * stride_s + group * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + cols * stride_s + group * stride_sg, mask=mask_n, other=0).to(tl.float32) + 128.0
    # x . (q - z) s = s (x . (128 + q) - (128 + z) sum x)
    return acc + (partial - zero[:, None] * x_sum[None, :]) * scale[:, None], squares


@triton.jit
def _int4_mma_tile(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, norm_ptr, rows_m, mask_m, cols, mask_n, first_group,
                   groups, K, eps, stride_xm, stride_q, stride_s, stride_sg, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, USE_ASM: tl.constexpr, NORM: tl.constexpr, TILED: tl.constexpr):
    """The [BLOCK_N, BLOCK_M] fp32 product over `groups` groups from `first_group`, one group a
    step. NORM (whole-K programs only): the product of RMSNorm(x)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    squares = tl.zeros((BLOCK_M,), tl.float32)
    for group in range(first_group, first_group + groups):
        packed = _load_group(qweight_ptr, cols, mask_n, group, stride_q, GROUP, TILED)
        acc, squares = _int4_mma_group(acc, squares, packed, x_ptr, scales_ptr, zeros_ptr, norm_ptr, rows_m, mask_m,
                                       cols, mask_n, group, stride_xm, stride_s, stride_sg, GROUP, BLOCK_M, BLOCK_N,
                                       USE_ASM, NORM)
    if NORM:
        acc *= (1.0 / tl.sqrt(squares / K + eps))[None, :]
    return acc


@triton.jit
def _store_output(acc, up, out_ptr, residual_ptr, rows_m, mask_m, cols, mask_n, stride_om, stride_rm,
                  GATED: tl.constexpr, ADD_RESIDUAL: tl.constexpr):
    """The epilogue of a [BLOCK_N, BLOCK_M] tile (transposed): silu(gate) * up, + residual, store."""
    if GATED:
        acc = acc * tl.sigmoid(acc) * up
    mask = mask_n[:, None] & mask_m[None, :]
    if ADD_RESIDUAL:
        acc += tl.load(residual_ptr + rows_m[None, :] * stride_rm + cols[:, None], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows_m[None, :] * stride_om + cols[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int4_mma_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, residual_ptr, workspace_ptr, counters_ptr, norm_ptr,
    M, N, K, groups, up_offset,  # N: output columns; groups: per K slice; gated: the up rows start at `up_offset`
    stride_xm, stride_om, stride_rm, stride_q, stride_s, stride_sg, eps,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_ASM: tl.constexpr, GATED: tl.constexpr, ADD_RESIDUAL: tl.constexpr, NORM: tl.constexpr,
    DEPENDENT: tl.constexpr, TILED: tl.constexpr,
):
    """One program per (BLOCK_N outputs, 1/SPLIT_K of K, BLOCK_M rows).

    With SPLIT_K > 1 the K slices of a tile add their fp32 partial sums into a workspace with
    atomics, and the program that arrives last (a per-tile counter) takes the sum, runs the
    epilogue and leaves workspace and counter at zero for the next call: split-K in one
    kernel, so that narrow layers (N = 4096) still fill every SM without a second launch."""
    wait_for_previous_kernel(DEPENDENT)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows_m < M
    mask_n = cols < N
    acc = _int4_mma_tile(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, norm_ptr, rows_m, mask_m, cols, mask_n,
                         pid_k * groups, groups, K, eps, stride_xm, stride_q, stride_s, stride_sg, GROUP, BLOCK_M,
                         BLOCK_N, USE_ASM, NORM, TILED)
    up = acc
    if GATED:
        up = _int4_mma_tile(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, norm_ptr, rows_m, mask_m, cols + up_offset,
                            mask_n, pid_k * groups, groups, K, eps, stride_xm, stride_q, stride_s, stride_sg, GROUP,
                            BLOCK_M, BLOCK_N, USE_ASM, NORM, TILED)
    if SPLIT_K == 1:
        _store_output(acc, up, out_ptr, residual_ptr, rows_m, mask_m, cols, mask_n, stride_om, stride_rm,
                      GATED, ADD_RESIDUAL)
    else:
        tile = pid_m * tl.num_programs(0) + pid_n
        TILE_SIZE: tl.constexpr = BLOCK_N * BLOCK_M
        local = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        partials = workspace_ptr + tile * (2 * TILE_SIZE if GATED else TILE_SIZE) + local
        # Only real rows and columns: at one input row, 15 of the tile's 16 columns are padding.
        valid = mask_n[:, None] & mask_m[None, :]
        tl.atomic_add(partials, acc, mask=valid, sem="relaxed")
        if GATED:
            tl.atomic_add(partials + TILE_SIZE, up, mask=valid, sem="relaxed")
        tl.debug_barrier()  # every thread's partial sums are in before the counter moves
        arrived = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last K slice of this tile: finish it
            tl.debug_barrier()
            acc = tl.load(partials, mask=valid, other=0.0, cache_modifier=".cg")  # from L2, where the atomics landed
            tl.store(partials, tl.zeros((BLOCK_N, BLOCK_M), tl.float32), mask=valid)
            if GATED:
                up = tl.load(partials + TILE_SIZE, mask=valid, other=0.0, cache_modifier=".cg")
                tl.store(partials + TILE_SIZE, tl.zeros((BLOCK_N, BLOCK_M), tl.float32), mask=valid)
            tl.store(counters_ptr + tile, 0)
            _store_output(acc, up, out_ptr, residual_ptr, rows_m, mask_m, cols, mask_n, stride_om, stride_rm,
                          GATED, ADD_RESIDUAL)


@triton.jit
def _dequantize_kernel(qweight_ptr, scales_ptr, zeros_ptr, out_ptr, stride_q, stride_s, stride_sg, stride_o,
                       GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILED: tl.constexpr):
    """(q - z) s of a [BLOCK_N, BLOCK_K] tile, stored row by row in input order: word 8 b + r
    holds inputs 64 b + 8 j + r, so the eight values of each word are joined into [.., word, j]
    and the tile permuted to [.., b, j, r] in registers (written value by value, with each
    value's inputs 8 apart, 2-byte stores made a prefill's dequantization slow)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    word_index = tl.program_id(1) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    packed = tl.load(qweight_ptr + _word_offsets(rows[:, None], word_index[None, :], stride_q, TILED))
    groups = rows[:, None] * stride_s + (word_index // (GROUP // 8))[None, :] * stride_sg
    scale = tl.load(scales_ptr + groups).to(tl.float32)
    zero = tl.load(zeros_ptr + groups).to(tl.float32) + 128.0
    v = ()
    for j in tl.static_range(8):
        v = v + (((_offset_values(packed, j) - zero) * scale).to(out_ptr.dtype.element_ty),)
    # Joined so that the last axis is j: each join adds the next bit of j as the new minor axis.
    by_j = tl.join(tl.join(tl.join(v[0], v[4]), tl.join(v[2], v[6])), tl.join(tl.join(v[1], v[5]), tl.join(v[3], v[7])))
    tile = tl.reshape(tl.permute(tl.reshape(by_j, (BLOCK_N, BLOCK_K // 64, 8, 8)), (0, 1, 3, 2)), (BLOCK_N, BLOCK_K))
    inputs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * stride_o + inputs[None, :], tile)


def _word_stride(weight: Int4Weight) -> int:
    """The kernels' `stride_q`: words from one row to the next, or tiled, the words of a row."""
    return weight.words_per_row if weight.tiled else weight.qweight.stride(0)


def dequantize(weight: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] in `dtype`, in one kernel (N a multiple of 16, K of 64). Tiles of 16 x 256 are
    within 3% of the best of 16-64 rows x 128-512 inputs x 4 or 8 warps on an H100 (a Llama-3-8B
    layer's four weights in 330 us against 320; 519 -> 138 us for gate/up, session 10)."""
    n, k = weight.shape
    out = torch.empty((n, k), dtype=dtype, device=weight.qweight.device)
    block_k = min(256, k & -k)
    _dequantize_kernel[(triton.cdiv(n, 16), k // block_k)](
        weight.qweight, weight.scales, weight.zeros, out, _word_stride(weight), *weight.scales.stride(),
        out.stride(0), GROUP=weight.group_size, BLOCK_N=16, BLOCK_K=block_k, TILED=weight.tiled, num_warps=4)
    return out


@dataclass(frozen=True)
class GemvConfig:  # CUDA cores; one program per (input row, BLOCK_N outputs)
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class DotConfig:  # tensor cores; one program per (BLOCK_M rows, BLOCK_N outputs, K slice)
    block_m: int
    block_n: int
    programs: int  # split K until about this many programs run (1: never split)
    num_warps: int
    num_stages: int
    use_asm: bool = True  # unpack with inline PTX (bf16 activations only)


# Configs chosen by measurement on an H100 (benchmarks/int4_kernels.py --sweep), per Llama-3-8B layer
# (q/k/v, o, gate/up, down; bf16 cuBLAS takes 166-173 us for any of these row counts):
# - up to 16 rows, tensor cores: 83 us at 1 row (the CUDA-core GEMV: 99 us), 90 us at 16 (the first
#   tensor-core kernel: 360 us); 256-row weight tiles for the widest layers, NARROW_CONFIG below for the rest;
# - up to 64 rows: 128-row tiles, 212 us (was 405 us);
# - groups of 64 (SmolLM2's K = 576): the GEMV up to 8 rows (the tensor-core kernel gave wrong
#   sums with 8-word groups on the H100, so it refuses them). Session 17, SmolLM2 INT4 decode at 8
#   concurrent: 7,918 tok/s against 7,397 with the GEMV up to 4 rows (bf16 7,954); at 16 rows the GEMV,
#   one program a row, is slower than cuBLAS on the dequantized weights (10,515 against 14,549);
# - beyond: dequantize into bf16 and let cuBLAS multiply (compute-bound there, the extra pass costs little).
GEMV_MAX_ROWS = 8
GEMV_CONFIG = GemvConfig(8, 1024, 4, 3)
DOT_CONFIGS = {16: DotConfig(16, 256, 264, 4, 3), 64: DotConfig(64, 128, 264, 4, 3),
               128: DotConfig(64, 128, 264, 8, 4)}
# Up to 16 rows, all but the widest layers (Llama-3-8B's q/k/v, o, down; all of SmolLM2's):
# 128-row tiles, more programs (session 4, 1 row: q/k/v 13.0 -> 11.7 us, o 10.6 -> 9.7, down 23.0 -> 20.6;
# gate/up, N = 28,672, keeps 256-row tiles: 38.9 us against 42.5).
WIDE_N, NARROW_CONFIG = 16384, DotConfig(16, 128, 528, 4, 3)


# Up to 8 bf16 rows: the Gluon kernel (int4_skinny.py), which loads the words where the tensor cores
# take them (session 6, 1 row: 68 us a layer against the tile kernel's 82; 8 rows: 74; at 16 rows the
# tile kernel wins). Programs per SM and warps per layer width, from sweeps: 4 programs of 4 warps,
# and 2 of 8 warps for the widest layer (N >= WIDE_N, Llama-3-8B's gate/up), in one wave. On row-major
# words that layer's programs streamed at uneven rates and ended up to 6 us apart, and two waves paid
# (session 9, Llama-3-8B step at 1 / 4 / 8 rows: 2,632 -> 2,570 / 2,915 -> 2,889 / 3,054 -> 3,036 us); on
# tiled words one wave is faster again (session 21, the same step: 2,215 -> 2,179 / 2,792 -> 2,700 /
# 2,801 -> 2,751 us, and 2,493 -> 2,392 at 2 rows). Two waves of the other layers, or 8-warp programs
# for them, measured slower on both layouts.
SKINNY_ROWS = 8
# Split K in int64 fixed point (int4_skinny.FIXED_BITS: one returning atomic a partial sum, no fence,
# counter or read-back) up to these rows; float atomics beyond, where each thread has more outputs
# to add and the returning 64-bit atomics cost more than they save. Session 13, Llama-3-8B step
# replays: 1 row 2,564 -> 2,463 us (fixed for q/k/v, o and down: 2,487), 2 rows 2,677 -> 2,659
# (gate/up too: 2,667), 8 rows 2,973 -> 3,185 (fixed for all but gate/up).
FIXED_ROWS, FIXED_GATED_ROWS = 2, 1
SKINNY_SHAPE = dict(block_n=128, programs_per_sm=4, num_warps=4)
SKINNY_WIDE_SHAPE = dict(block_n=128, programs_per_sm=2, num_warps=8)


def skinny_config(block_n: int, programs_per_sm: int, num_warps: int, waves: int = 1) -> SkinnyConfig:
    """A skinny-kernel config whose programs fill whole waves of this GPU's SMs."""
    return SkinnyConfig(block_n, programs_per_sm * sm_count(), num_warps, waves)


@dataclass(frozen=True)
class WgmmaConfig:  # Hopper wgmma (int4_wgmma.py); one program per (tile, K slice), all rows at once
    block_n: int  # weight rows per tile (gated: half gate rows, half up rows)
    num_warps: int
    programs: int  # K is split until about this many programs run (at most one slice per group)
    x_ahead: int = 1  # x is loaded this many groups ahead (1 or 2)
    ring: int = 0  # > 1: words, scales and zero points through a shared-memory ring of this many groups

    def __post_init__(self):
        if self.ring == 1:  # the ring fills ring - 1 groups ahead: one slot would fill none
            raise ValueError("a wgmma ring holds at least 2 groups")


# 9 to 128 bf16 rows on Hopper: the wgmma kernel (int4_wgmma.py). One Llama-3-8B layer's four matmuls
# against the tile kernel (session 11, H100, benchmarks/int4_kernels.py), us: 16 rows 81 / 95,
# 32 rows 105 / 154, 64 rows 145 / 216 (bf16 cuBLAS 173), 128 rows 294 / 370 (bf16 181). Tiles of 256
# rows, one program an SM, are the best single choice up to 64 rows; up to 32 rows the narrower
# layers (N < WIDE_N) prefer 128-row tiles, two programs an SM; at 128 rows 256-row tiles no longer fit
# in registers for them. x two groups ahead where registers allow (int4_wgmma.py: 1-12% faster there).
# Session 12 (interleaved A/B, medians of 5): up to 32 rows the widest layer too prefers 128-row tiles,
# two an SM (gate/up at 16 / 32 rows 41.9 / 50.8 -> 37.4 / 48.3 us); at 128 rows it takes its words
# through a ring of 3 groups in shared memory, which frees the registers that held them so that 256-row
# tiles fit (143.2 -> 113.0 us). At 16-64 rows the ring measured 2-27% slower.
# (block_n, warps, programs per SM, x_ahead, ring) for narrow and wide layers, by the most rows they serve:
WGMMA_SHAPES = {32: ((128, 8, 2, 2, 0), (128, 8, 2, 2, 0)), 64: ((256, 8, 1, 2, 0), (256, 8, 1, 1, 0)),
                128: ((128, 8, 1, 2, 0), (256, 8, 1, 1, 3))}


def wgmma_config(block_n: int, num_warps: int, programs_per_sm: int, x_ahead: int = 1, ring: int = 0) -> WgmmaConfig:
    return WgmmaConfig(block_n, num_warps, programs_per_sm * sm_count(), x_ahead, ring)


@functools.cache
def _hopper() -> bool:
    """wgmma is sm_90's (Blackwell's tensor cores take other instructions)."""
    return not INTERPRETED and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


Config = GemvConfig | DotConfig | SkinnyConfig | WgmmaConfig


def kernel_config(rows: int, group_size: int = 128, n: int | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> Config | None:
    """The kernel and tile for `rows` input rows (of a weight with N = `n` outputs); None:
    dequantize and use cuBLAS."""
    if group_size < 128:  # 8 words a group: too short a step for the tensor-core kernel
        return GEMV_CONFIG if rows <= GEMV_MAX_ROWS else None
    if rows <= SKINNY_ROWS and dtype == torch.bfloat16 and not INTERPRETED:
        return skinny_config(**(SKINNY_WIDE_SHAPE if n is not None and n >= WIDE_N else SKINNY_SHAPE))
    if rows <= WGMMA_MAX_ROWS and dtype == torch.bfloat16 and _hopper():
        narrow, wide = next(shapes for limit, shapes in WGMMA_SHAPES.items() if rows <= limit)
        return wgmma_config(*(wide if n is not None and n >= WIDE_N else narrow))
    if rows <= 16 and n is not None and n < WIDE_N:
        return NARROW_CONFIG
    return next((config for limit, config in DOT_CONFIGS.items() if rows <= limit), None)


_split_k_buffers = SplitBuffers()  # split-K workspace (fp32 partial sums) and per-tile arrival counters


def _dot_grid(config: DotConfig, weight: Int4Weight, rows: int, gated: bool) -> tuple[int, int, int]:
    """(programs along N, along M, K slices) of the tile kernel."""
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    grid_n = triton.cdiv(n, config.block_n)
    grid_m = triton.cdiv(rows, config.block_m)
    groups = weight.shape[1] // weight.group_size
    return grid_n, grid_m, _split_k(config, grid_n * grid_m, groups)


def _split_k(config: DotConfig, tiles: int, groups: int) -> int:
    """The number of K slices: doubled while the grid is short of `config.programs` and each
    slice keeps a whole number of groups."""
    split = 1
    while tiles * split * 2 <= config.programs and groups % (split * 2) == 0:
        split *= 2
    return split


def _split_k_workspace(out: torch.Tensor, grid: tuple[int, int, int], tile_size: int,
                       gated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(workspace, counters) for a tile-kernel launch on `grid`; without split K the kernel
    touches neither, and `out` stands in for both."""
    grid_n, grid_m, split = grid
    if split == 1:
        return out, out
    return _split_k_buffers.get(out.device, grid_n * grid_m * tile_size * (2 if gated else 1), grid_n * grid_m)


def int4_matmul(x: torch.Tensor, weight: Int4Weight, residual: torch.Tensor | None = None, gated: bool = False,
                config: Config | None | str = "auto",
                norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """x [M, K] (bf16 or fp16) -> [M, N] (or [M, N/2] gated), optionally + residual [M, N].

    `norm` = (weight, eps): multiply RMSNorm(x) instead of x; fused into the kernel when its
    programs see whole rows (the GEMV, the tile kernel without split K) or read them for it
    (the skinny kernel, up to int4_skinny.NORM_ROWS rows), else a kernel of its own first."""
    x = x.contiguous()
    m, k = x.shape
    if config == "auto":
        config = kernel_config(m, weight.group_size, weight.shape[0], x.dtype)
    if isinstance(config, (DotConfig, SkinnyConfig, WgmmaConfig)) and weight.group_size < 128:
        raise ValueError(f"the tensor-core INT4 kernels need groups of 128 inputs, not {weight.group_size}")
    if weight.zeros.stride() != weight.scales.stride():
        raise ValueError("INT4 scales and zeros must be stored alike (both row by row or both group by group)")
    if isinstance(config, SkinnyConfig) and (m > SKINNY_MAX_ROWS or x.dtype != torch.bfloat16):
        raise ValueError(f"the skinny INT4 kernel takes up to {SKINNY_MAX_ROWS} bf16 rows, not {m} in {x.dtype}")
    if isinstance(config, WgmmaConfig) and (m > WGMMA_MAX_ROWS or x.dtype != torch.bfloat16):
        raise ValueError(f"the wgmma INT4 kernel takes up to {WGMMA_MAX_ROWS} bf16 rows, not {m} in {x.dtype}")
    grid = _dot_grid(config, weight, m, gated) if isinstance(config, DotConfig) else None
    if norm is not None and (config is None or isinstance(config, SkinnyConfig) and not fuses_norm(m, k)
                             or isinstance(config, WgmmaConfig) or grid is not None and grid[2] > 1):
        x, norm = rms_norm(x, *norm), None  # the kernel sees only part of each row: norm first
    if config is None:
        dense = dequantize(weight, x.dtype)
        if gated:
            return silu_and_mul(torch.nn.functional.linear(x, dense))
        return torch.nn.functional.linear(x, dense) if residual is None else torch.addmm(residual, x, dense.T)
    rows, _ = weight.shape
    n = rows // 2 if gated else rows
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if residual is not None:
        residual = residual.contiguous()
    tensors = (x, weight.qweight, weight.scales, weight.zeros, out, residual if residual is not None else out)
    strides = (x.stride(0), out.stride(0), residual.stride(0) if residual is not None else out.stride(0),
               _word_stride(weight), *weight.scales.stride())  # scales and zeros share their layout
    if isinstance(config, SkinnyConfig):
        _launch_skinny(config, tensors, strides, weight, m, n, k, gated, residual is not None, norm)
        return out
    if isinstance(config, WgmmaConfig):
        _launch_wgmma(config, tensors, strides, m, n, k // weight.group_size, gated, residual is not None,
                      weight.tiled)
        return out
    dependent = dependent_launch(x.device)
    common = dict(GROUP=weight.group_size, GATED=gated, ADD_RESIDUAL=residual is not None,
                  num_warps=config.num_warps, num_stages=config.num_stages, DEPENDENT=dependent,
                  TILED=weight.tiled, launch_pdl=dependent)
    if isinstance(config, GemvConfig):
        block_k = min(config.block_k, triton.next_power_of_2(k))
        share_decode_configuration(_int4_gemv_kernel[(m, triton.cdiv(n, config.block_n))](
            *tensors, norm[0] if norm else x, n, k, n, *strides, norm[1] if norm else 0.0, BLOCK_N=config.block_n,
            BLOCK_K=block_k, NORM=norm is not None, **common))
        return out
    grid_n, grid_m, split = grid
    _int4_mma_kernel[(grid_n, split, grid_m)](
        *tensors, *_split_k_workspace(out, grid, config.block_n * config.block_m, gated), norm[0] if norm else x,
        m, n, k, k // weight.group_size // split, n, *strides, norm[1] if norm else 0.0, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, NORM=norm is not None, SPLIT_K=split,
        USE_ASM=config.use_asm and x.dtype == torch.bfloat16 and not INTERPRETED, **common)
    return out


class LaunchTimelines:
    """For benchmarks: per-program timestamps of skinny launches (int4_skinny's TIMELINE). While
    one is installed as `int4_kernels.timelines`, each launch stamps the next [max_programs, 8]
    slice of a ring allocated up front, so that a CUDA graph can be captured with it."""

    def __init__(self, launches: int, max_programs: int, device: torch.device | str = "cuda"):
        self.buffer = torch.zeros(launches, max_programs, 8, dtype=torch.int64, device=device)
        self.launched = 0

    def next_slice(self, programs: int) -> torch.Tensor:
        if programs > self.buffer.shape[1]:
            raise ValueError(f"{programs} programs, the timeline holds {self.buffer.shape[1]}")
        self.launched += 1
        return self.buffer[(self.launched - 1) % self.buffer.shape[0]]

    def latest(self, count: int) -> list[torch.Tensor]:
        """The slices of the last `count` launches, oldest first (rows of programs that did not run stay 0)."""
        return [self.buffer[(self.launched - count + i) % self.buffer.shape[0]] for i in range(count)]


timelines: LaunchTimelines | None = None


def _launch_skinny(config: SkinnyConfig, tensors: tuple, strides: tuple, weight: Int4Weight, m: int, n: int, k: int,
                   gated: bool, add_residual: bool, norm: tuple[torch.Tensor, float] | None) -> None:
    tiles = triton.cdiv(n, config.block_n)
    groups = k // weight.group_size
    block_m = skinny_block_m(m)
    programs = min(config.programs * config.waves, tiles * groups)  # every program has a unit (the kernel relies on it)
    slots = staged_groups(tiles * groups, programs, groups, block_m)
    tile_size = config.block_n * block_m * (2 if gated else 1)
    fixed = m <= (FIXED_GATED_ROWS if gated else FIXED_ROWS)  # split-K in int64 fixed point (int4_skinny.FIXED_BITS)
    workspace, counters = _split_k_buffers.get(tensors[0].device, tiles * tile_size * (2 if fixed else 1), tiles)
    if fixed:
        workspace = workspace[:workspace.numel() // 2 * 2].view(torch.int64)
    unit_row_stride = weight.qweight.stride(-2)  # words from a unit's row to the next: a row's, or tiled, 16
    dependent = dependent_launch(tensors[0].device)
    share_decode_configuration(int4_skinny_kernel[(programs,)](
        *tensors, workspace, counters, norm[0] if norm else tensors[0], m, n, k, groups, tiles * groups, n,
        norm[1] if norm else 0.0, *strides, unit_row_stride, BLOCK_N=config.block_n, BLOCK_M=block_m, SLOTS=slots,
        GATED=gated, ADD_RESIDUAL=add_residual, NORM_ROWS=m if norm else 0,
        NORM_BLOCK=triton.next_power_of_2(k) if norm else 1, DEPENDENT=dependent, FIXED=fixed, TILED=weight.tiled,
        IN_BLOCK=UNIT_ROWS % config.block_n == 0 and (not gated or n % config.block_n == 0),
        num_warps=config.num_warps, TIMELINE=timelines is not None,
        timeline_ptr=timelines.next_slice(programs) if timelines is not None else None,
        maxnreg=_register_cap(min(programs, config.programs), config.num_warps, tensors[0].device),
        launch_pdl=dependent))


def _register_cap(programs: int, num_warps: int, device: torch.device) -> int:
    """Registers a thread may use so that `programs` are resident at once (a wave): an SM's
    64k registers over the programs it must hold."""
    per_sm = triton.cdiv(programs, sm_count(device.index))
    return min(255, 65536 // (per_sm * num_warps * 32) // 8 * 8)


def _launch_wgmma(config: WgmmaConfig, tensors: tuple, strides: tuple, m: int, n: int, groups: int, gated: bool,
                  add_residual: bool, tiled: bool) -> None:
    outputs = config.block_n // 2 if gated else config.block_n  # gated tiles: half gate rows, half up rows
    tiles = triton.cdiv(n, outputs)
    split = max(1, min(groups, config.programs // tiles))
    block_m = max(16, triton.next_power_of_2(m))
    workspace, counters = _split_k_buffers.get(tensors[0].device, tiles * config.block_n * block_m, tiles)
    # cp.async moves 4-16 aligned bytes: the ring needs scales and zero points group by group
    # (a group's are contiguous), the up rows and each group's row 16-aligned; else registers.
    _, _, _, _, stride_s, stride_sg = strides
    ring = config.ring if stride_s == 1 and stride_sg % 16 == 0 and n % 16 == 0 else 0
    dependent = dependent_launch(tensors[0].device)
    int4_wgmma_kernel[(tiles, split)](
        *tensors, workspace, counters, m, n, groups, split, n, *strides, BLOCK_N=config.block_n, BLOCK_M=block_m,
        GATED=gated, ADD_RESIDUAL=add_residual, X_AHEAD=config.x_ahead, RING=ring, DEPENDENT=dependent, TILED=tiled,
        num_warps=config.num_warps, launch_pdl=dependent)
