"""W4A16 matmul in Triton: bf16/fp16 activations times lowbit's INT4 weights (see quantization.py).

One kernel serves decode (1-16 rows) and prefill (thousands of rows); only the tile shape
changes. Each K step covers one quantization group:
- the packed words [BLOCK_N, G/8] are unpacked with a shift and a mask, and each 4-bit q
  becomes the float 128 + q by or-ing it into the mantissa of 128.0 (exact in bf16 and
  fp16, no int-to-float conversion, which is a slow instruction);
- the tensor cores compute P = x . (128 + q) for the group in fp32;
- the group's scale and zero point are applied once per output, not per weight:
  x . ((q - z) s) = s (P - (128 + z) sum(x)).
Epilogues: `residual` adds a tensor to the output (the residual stream); `gated` reads the
gate rows [0, N/2) and the up rows [N/2, N) and writes silu(gate) * up.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engines.native.quantization import Int4Weight


@triton.jit
def _group_dot(x, x_sum, qweight_ptr, scales_ptr, zeros_ptr, rows, row_mask, group, stride_q, stride_s,
               GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """x [BLOCK_M, GROUP] . dequantized W[rows, group]^T -> [BLOCK_M, BLOCK_N] fp32."""
    words = tl.arange(0, GROUP // 8)
    packed = tl.load(qweight_ptr + rows[:, None] * stride_q + group * (GROUP // 8) + words[None, :],
                     mask=row_mask[:, None], other=0)  # [BLOCK_N, GROUP / 8] int32
    shifts = tl.arange(0, 8) * 4
    nibbles = (packed[:, :, None] >> shifts[None, None, :]) & 0xF  # [BLOCK_N, GROUP / 8, 8]
    # 128 + q: q in mantissa bits 16..19 of the float32 128.0; the low 16 bits stay zero, so the
    # cast to 16-bit floats is exact.
    offset = ((nibbles << 16) | 0x43000000).to(tl.float32, bitcast=True).to(x.dtype)
    weights = tl.reshape(offset, (BLOCK_N, GROUP))
    partial = tl.dot(x, tl.trans(weights))  # [BLOCK_M, BLOCK_N]
    scale = tl.load(scales_ptr + rows * stride_s + group, mask=row_mask, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + rows * stride_s + group, mask=row_mask, other=0).to(tl.float32) + 128.0
    return (partial - x_sum[:, None] * zero[None, :]) * scale[None, :]


@triton.jit
def _int4_matmul_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, residual_ptr,
    M, N, K, up_offset,  # N: output columns; gated: the up rows start at row `up_offset`
    stride_xm, stride_om, stride_rm, stride_q, stride_s,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GATED: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows_m < M
    mask_n = cols < N
    inputs = tl.arange(0, GROUP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for group in range(0, K // GROUP):
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + group * GROUP + inputs[None, :],
                    mask=mask_m[:, None], other=0.0)  # [BLOCK_M, GROUP]
        x_sum = tl.sum(x.to(tl.float32), axis=1)
        acc += _group_dot(x, x_sum, qweight_ptr, scales_ptr, zeros_ptr, cols, mask_n, group, stride_q, stride_s,
                          GROUP, BLOCK_N)
        if GATED:
            acc_up += _group_dot(x, x_sum, qweight_ptr, scales_ptr, zeros_ptr, cols + up_offset, mask_n, group,
                                 stride_q, stride_s, GROUP, BLOCK_N)
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    out_mask = mask_m[:, None] & mask_n[None, :]
    if ADD_RESIDUAL:
        acc += tl.load(residual_ptr + rows_m[:, None] * stride_rm + cols[None, :], mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows_m[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by number of rows; measured on an H100 (benchmarks/native_gpu.py).
TILE_CONFIGS = {
    16: (16, 32, 4, 4),
    32: (32, 64, 4, 4),
    64: (64, 64, 4, 3),
    128: (64, 128, 4, 3),
    None: (128, 128, 8, 3),  # more rows: prefill
}


def tile_config(rows: int) -> tuple[int, int, int, int]:
    for limit, config in TILE_CONFIGS.items():
        if limit is None or rows <= limit:
            return config
    raise AssertionError


def int4_matmul(x: torch.Tensor, weight: Int4Weight, residual: torch.Tensor | None = None, gated: bool = False,
                config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (bf16 or fp16) -> [M, N] (or [M, N/2] gated), optionally + residual [M, N]."""
    x = x.contiguous()
    m, k = x.shape
    rows, _ = weight.shape
    n = rows // 2 if gated else rows
    block_m, block_n, num_warps, num_stages = config or tile_config(m)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if residual is not None:
        residual = residual.contiguous()
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _int4_matmul_kernel[grid](
        x, weight.qweight, weight.scales, weight.zeros, out, residual if residual is not None else out,
        m, n, k, n, x.stride(0), out.stride(0), out.stride(0), weight.qweight.stride(0), weight.scales.stride(0),
        GROUP=weight.group_size, BLOCK_M=block_m, BLOCK_N=block_n, GATED=gated, ADD_RESIDUAL=residual is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
