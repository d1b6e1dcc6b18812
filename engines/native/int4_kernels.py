"""W4A16 matmul in Triton: bf16/fp16 activations times lowbit's INT4 weights (see quantization.py).

Three paths, by the number of input rows M (`kernel_config`):
- M <= 4 (decode at small batch): a GEMV on CUDA cores that streams the packed words with many
  programs in flight;
- M <= 128 (larger decode batches): tensor cores, one quantization group per K step;
- more rows (prefill): dequantize to bf16 in one kernel, then cuBLAS (compute-bound there).
Both kernels unpack value j of every word with a shift and an and-or that turns the 4-bit q
into the float 128 + q (q placed into the mantissa of 128.0: no int-to-float conversion,
which is a slow instruction), and apply each group's scale and zero point once per output
and group rather than per weight: x . ((q - z) s) = s (x . (128 + q) - (128 + z) sum(x)).
Epilogues: `residual` adds a tensor to the output (the residual stream); `gated` reads the
gate rows [0, N/2) and the up rows [N/2, N) and writes silu(gate) * up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engines.native.quantization import Int4Weight


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
def _input_of(word_index, j: tl.constexpr):
    """The input (k) that value j of each word holds: words interleave in blocks of 8 (64 inputs)."""
    return (word_index // 8) * 64 + j * 8 + word_index % 8


@triton.jit
def _int4_gemv_tile(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, row, cols, mask_n, K, stride_xm, stride_q, stride_s,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k x[row, k] W[cols, k] on CUDA cores, fp32 -> [BLOCK_N].

    The step's words are a [BLOCK_N, groups, words per group] tile, so a group's scale and zero
    point are loaded once and broadcast over its words (loading them per word made the L1
    cache, not DRAM, the bottleneck: 72% L1 against 28% DRAM busy under ncu)."""
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    WORDS: tl.constexpr = GROUP // 8
    group_ids = tl.arange(0, GROUPS)
    step_words = group_ids[:, None] * WORDS + tl.arange(0, WORDS)[None, :]  # [GROUPS, WORDS]
    mask = mask_n[:, None, None]
    acc = tl.zeros((BLOCK_N, GROUPS, WORDS), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        word_index = k0 // 8 + step_words
        packed = tl.load(qweight_ptr + cols[:, None, None] * stride_q + word_index[None, :, :], mask=mask, other=0)
        groups = cols[:, None] * stride_s + (k0 // GROUP + group_ids)[None, :]  # [BLOCK_N, GROUPS]
        scale = tl.load(scales_ptr + groups, mask=mask_n[:, None], other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + groups, mask=mask_n[:, None], other=0).to(tl.float32) + 128.0
        partial = tl.zeros((BLOCK_N, GROUPS, WORDS), tl.float32)
        x_sum = tl.zeros((GROUPS, WORDS), tl.float32)
        for j in tl.static_range(8):
            x = tl.load(x_ptr + row * stride_xm + _input_of(word_index, j)).to(tl.float32)  # [GROUPS, WORDS]
            x_sum += x
            partial += _offset_values(packed, j) * x[None, :, :]
        # x . (q - z) s = s (x . (128 + q) - (128 + z) sum x)
        acc += scale[:, :, None] * (partial - zero[:, :, None] * x_sum[None, :, :])
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _int4_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, residual_ptr,
    N, K, up_offset, stride_xm, stride_om, stride_rm, stride_q, stride_s,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GATED: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0)  # fastest-varying: the rows of one weight tile run together and share it in L2
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    out = _int4_gemv_tile(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, row, cols, mask_n, K, stride_xm, stride_q,
                          stride_s, GROUP, BLOCK_N, BLOCK_K)
    if GATED:
        up = _int4_gemv_tile(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, row, cols + up_offset, mask_n, K, stride_xm,
                             stride_q, stride_s, GROUP, BLOCK_N, BLOCK_K)
        out = out * tl.sigmoid(out) * up
    if ADD_RESIDUAL:
        out += tl.load(residual_ptr + row * stride_rm + cols, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, out.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _int4_dot_tile(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, rows_m, mask_m, cols, mask_n, K, stride_xm, stride_q,
                   stride_s, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   WEIGHTS_FIRST: tl.constexpr):
    """x[rows_m] . W[cols]^T on tensor cores, one group per K step -> [BLOCK_M, BLOCK_N] fp32.

    WEIGHTS_FIRST computes the transpose, W . x^T, so that the unpacked weights (made in
    registers) are the first operand, which Hopper's tensor cores read from registers; as the
    second operand they would take a trip through shared memory every step."""
    words = tl.arange(0, GROUP // 8)
    if WEIGHTS_FIRST:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, GROUP):
        packed = tl.load(qweight_ptr + cols[:, None] * stride_q + (k0 // 8 + words)[None, :],
                         mask=mask_n[:, None], other=0)  # [BLOCK_N, GROUP / 8]
        if WEIGHTS_FIRST:
            partial = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        else:
            partial = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        x_sum = tl.zeros((BLOCK_M,), tl.float32)
        for j in tl.static_range(8):  # the j-th value of every word
            x = tl.load(x_ptr + rows_m[:, None] * stride_xm + _input_of(k0 // 8 + words, j)[None, :],
                        mask=mask_m[:, None], other=0.0)  # [BLOCK_M, GROUP / 8]
            x_sum += tl.sum(x.to(tl.float32), axis=1)
            weights = _offset_values(packed, j).to(x.dtype)  # [BLOCK_N, GROUP / 8]
            if WEIGHTS_FIRST:
                partial = tl.dot(weights, tl.trans(x), partial)
            else:
                partial = tl.dot(x, tl.trans(weights), partial)
        group = k0 // GROUP
        scale = tl.load(scales_ptr + cols * stride_s + group, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + cols * stride_s + group, mask=mask_n, other=0).to(tl.float32) + 128.0
        if WEIGHTS_FIRST:
            acc += (partial - zero[:, None] * x_sum[None, :]) * scale[:, None]
        else:
            acc += (partial - x_sum[:, None] * zero[None, :]) * scale[None, :]
    if WEIGHTS_FIRST:
        return tl.trans(acc)
    return acc


@triton.jit
def _int4_matmul_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, residual_ptr,
    M, N, K, up_offset,  # N: output columns; gated: the up rows start at row `up_offset`
    stride_xm, stride_om, stride_rm, stride_q, stride_s,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WEIGHTS_FIRST: tl.constexpr,
    GATED: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows_m < M
    mask_n = cols < N
    acc = _int4_dot_tile(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, rows_m, mask_m, cols, mask_n, K, stride_xm,
                         stride_q, stride_s, GROUP, BLOCK_M, BLOCK_N, WEIGHTS_FIRST)
    if GATED:
        up = _int4_dot_tile(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, rows_m, mask_m, cols + up_offset, mask_n, K,
                            stride_xm, stride_q, stride_s, GROUP, BLOCK_M, BLOCK_N, WEIGHTS_FIRST)
        acc = acc * tl.sigmoid(acc) * up
    out_mask = mask_m[:, None] & mask_n[None, :]
    if ADD_RESIDUAL:
        acc += tl.load(residual_ptr + rows_m[:, None] * stride_rm + cols[None, :], mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows_m[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dequantize_kernel(qweight_ptr, scales_ptr, zeros_ptr, out_ptr, stride_q, stride_s, stride_o,
                       GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    word_index = tl.program_id(1) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    packed = tl.load(qweight_ptr + rows[:, None] * stride_q + word_index[None, :])
    groups = rows[:, None] * stride_s + (word_index // (GROUP // 8))[None, :]
    scale = tl.load(scales_ptr + groups).to(tl.float32)
    zero = tl.load(zeros_ptr + groups).to(tl.float32) + 128.0
    for j in tl.static_range(8):
        value = (_offset_values(packed, j) - zero) * scale
        tl.store(out_ptr + rows[:, None] * stride_o + _input_of(word_index, j)[None, :],
                 value.to(out_ptr.dtype.element_ty))


def dequantize(weight: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] in `dtype`, in one kernel (N a multiple of 16, K of 64)."""
    n, k = weight.shape
    out = torch.empty((n, k), dtype=dtype, device=weight.qweight.device)
    block_k = min(256, k & -k)
    _dequantize_kernel[(triton.cdiv(n, 16), k // block_k)](
        weight.qweight, weight.scales, weight.zeros, out, weight.qweight.stride(0), weight.scales.stride(0),
        out.stride(0), GROUP=weight.group_size, BLOCK_N=16, BLOCK_K=block_k, num_warps=4)
    return out


@dataclass(frozen=True)
class GemvConfig:  # CUDA cores; one program per (input row, BLOCK_N outputs)
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class DotConfig:  # tensor cores; one program per (BLOCK_M rows, BLOCK_N outputs)
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    weights_first: bool = False


# Up to 4 rows: the CUDA-core GEMV; up to 128 rows with groups of 128: tensor cores; beyond (prefill),
# or with smaller groups: dequantize into bf16 and let cuBLAS multiply (compute-bound there, so the
# extra pass costs little). Configs chosen by measurement on an H100 (benchmarks/int4_kernels.py --sweep).
GEMV_MAX_ROWS = 4
DOT_MAX_ROWS = 128
GEMV_CONFIG = GemvConfig(8, 1024, 4, 3)  # 108 us per Llama-3-8B layer; bf16 166 us
# Measured per Llama-3-8B layer (q/k/v, o, gate/up, down): 16 rows 361 us, 64 rows 405 us weights
# first against 602 us the other way round; bf16 cuBLAS takes 170 us for either.
DOT_CONFIGS = {16: DotConfig(16, 16, 2, 4), 64: DotConfig(64, 64, 4, 3, True), 128: DotConfig(64, 64, 4, 3, True)}


def kernel_config(rows: int, group_size: int = 128) -> GemvConfig | DotConfig | None:
    """The kernel and tile for `rows` input rows; None: dequantize and use cuBLAS."""
    if rows <= GEMV_MAX_ROWS:
        return GEMV_CONFIG
    if rows > DOT_MAX_ROWS or group_size < 128:
        return None
    return next(config for limit, config in DOT_CONFIGS.items() if rows <= limit)


def int4_matmul(x: torch.Tensor, weight: Int4Weight, residual: torch.Tensor | None = None, gated: bool = False,
                config: GemvConfig | DotConfig | None | str = "auto") -> torch.Tensor:
    """x [M, K] (bf16 or fp16) -> [M, N] (or [M, N/2] gated), optionally + residual [M, N]."""
    x = x.contiguous()
    m, k = x.shape
    if config == "auto":
        config = kernel_config(m, weight.group_size)
    if config is None:
        dense = dequantize(weight, x.dtype)
        if gated:
            from engines.native.kernels import silu_and_mul

            return silu_and_mul(torch.nn.functional.linear(x, dense))
        return torch.nn.functional.linear(x, dense) if residual is None else torch.addmm(residual, x, dense.T)
    rows, _ = weight.shape
    n = rows // 2 if gated else rows
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if residual is not None:
        residual = residual.contiguous()
    common = dict(GROUP=weight.group_size, GATED=gated, ADD_RESIDUAL=residual is not None,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    tensors = (x, weight.qweight, weight.scales, weight.zeros, out, residual if residual is not None else out)
    strides = (x.stride(0), out.stride(0), out.stride(0), weight.qweight.stride(0), weight.scales.stride(0))
    if isinstance(config, GemvConfig):
        block_k = min(config.block_k, k & -k)  # the largest power of two dividing K (K = 576: 64)
        _int4_gemv_kernel[(m, triton.cdiv(n, config.block_n))](
            *tensors, n, k, n, *strides, BLOCK_N=config.block_n, BLOCK_K=block_k, **common)
    else:
        _int4_matmul_kernel[(triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m))](
            *tensors, m, n, k, n, *strides, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            WEIGHTS_FIRST=config.weights_first, **common)
    return out
