"""Triton kernels for the native engine on NVIDIA GPUs (imported only when running on CUDA).

paged_decode_attention: one program per (sequence, KV head). It reads only the sequence's
own blocks, up to its context length (so a block table padded for CUDA graphs costs
nothing), keeps a running max and sum for the softmax in fp32 and accumulates V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, context_lens_ptr, scale,
    stride_q_seq, stride_q_head,  # q: [seqs, heads, head_dim]
    stride_cache_block, stride_cache_slot, stride_cache_head,  # cache: [blocks, block_size, kv_heads, d]
    stride_table_seq,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)  # the query heads this KV head serves
    head_mask = tl.arange(0, GROUP_PAD) < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
                mask=head_mask[:, None], other=0.0).to(tl.float32)  # [GROUP_PAD, D]
    running_max = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    running_sum = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    slots = tl.arange(0, BLOCK_SIZE)
    num_blocks = (context_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    for index in range(0, num_blocks):
        block = tl.load(block_tables_ptr + seq * stride_table_seq + index)
        base = block * stride_cache_block + kv_head * stride_cache_head
        offsets = base + slots[:, None] * stride_cache_slot + dims[None, :]
        valid = index * BLOCK_SIZE + slots < context_len
        k = tl.load(k_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)  # [BS, D]
        v = tl.load(v_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BS]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(weights, axis=1)
        acc = acc * correction[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
        running_max = new_max
    out = acc / running_sum[:, None]
    tl.store(out_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [seqs, heads, head_dim] (contiguous) -> [seqs, heads, head_dim]."""
    seqs, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    out = torch.empty_like(q)
    _paged_decode_kernel[(seqs, kv_heads)](
        q, k_cache, v_cache, out, block_tables, context_lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 1), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        num_warps=4,
    )
    return out


@triton.jit
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, stride_row, size, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.arange(0, BLOCK)
    mask = columns < size
    x = tl.load(x_ptr + row * stride_row + columns, mask=mask, other=0.0).to(tl.float32)
    inverse = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / size + eps)
    weight = tl.load(weight_ptr + columns, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_row + columns, (x * inverse * weight).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """One kernel instead of eight: x [tokens, hidden] (contiguous) -> same shape and dtype."""
    out = torch.empty_like(x)
    _rms_norm_kernel[(x.shape[0],)](x, weight, out, x.stride(0), x.shape[1], eps,
                                    BLOCK=triton.next_power_of_2(x.shape[1]), num_warps=8)
    return out


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, stride_token, stride_head, stride_angle, HALF: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    index = tl.arange(0, HALF)
    base = x_ptr + token * stride_token + head * stride_head
    x1 = tl.load(base + index).to(tl.float32)
    x2 = tl.load(base + HALF + index).to(tl.float32)
    cos = tl.load(cos_ptr + token * stride_angle + index)
    sin = tl.load(sin_ptr + token * stride_angle + index)
    tl.store(base + index, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty))
    tl.store(base + HALF + index, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty))


def apply_rope_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in one kernel, in place. x: [tokens, heads, head_dim]; cos/sin fp32 [tokens, head_dim/2]."""
    _rope_kernel[(x.shape[0], x.shape[1])](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0),
                                           HALF=x.shape[2] // 2, num_warps=1)
    return x
