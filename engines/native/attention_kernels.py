"""Attention over the paged KV cache in Triton (imported only when running on CUDA). Softmax in fp32.

Cache layout: [blocks, block_size, kv_heads, head_dim]; a sequence's block table lists its
blocks in order, so token position p lives in block table[p // block_size], slot p % block_size.

- paged_decode_attention: one query per sequence; one program per (sequence, KV head), which
  serves all the query heads of that KV head (GQA, padded to 16 rows for the tensor cores) and
  reads only the sequence's own blocks up to its context length (so a block table padded for
  CUDA graphs costs nothing), 64 keys per step so that few steps run one after another.
- paged_prefill_attention: variable-length prompts in one launch, flash-attention style: one
  program per (sequence, BLOCK_M queries, head); keys stream from the cache in BLOCK_N tiles
  up to the causal limit, with a running max and sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from engines.native.kernels import dependent_launch, wait_for_previous_kernel


@triton.jit
def _attend_to_keys(q, k_ptr, v_ptr, table, kv_head, keys, key_mask, visible, scale, running_max, running_sum, acc,
                    stride_cache_block, stride_cache_slot, stride_cache_head,
                    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One online-softmax step of queries q [rows, D] over `keys` (positions), read from the cache
    through the sequence's block table; `visible` [rows, keys] masks what each query may see."""
    dims = tl.arange(0, HEAD_DIM)
    blocks = tl.load(table + keys // BLOCK_SIZE, mask=key_mask, other=0)
    offsets = blocks * stride_cache_block + (keys % BLOCK_SIZE) * stride_cache_slot + kv_head * stride_cache_head
    k = tl.load(k_ptr + offsets[:, None] + dims[None, :], mask=key_mask[:, None], other=0.0)  # [keys, D]
    v = tl.load(v_ptr + offsets[:, None] + dims[None, :], mask=key_mask[:, None], other=0.0)
    scores = tl.where(visible, tl.dot(q, tl.trans(k)) * scale, float("-inf"))  # [rows, keys] fp32
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    correction = tl.exp(running_max - new_max)
    weights = tl.exp(scores - new_max[:, None])
    running_sum = running_sum * correction + tl.sum(weights, axis=1)
    acc = acc * correction[:, None] + tl.dot(weights.to(v.dtype), v)
    return new_max, running_sum, acc


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, context_lens_ptr, scale,
    stride_q_seq, stride_q_head, stride_o_seq, stride_o_head,  # q, out: [seqs, heads, head_dim]
    stride_cache_block, stride_cache_slot, stride_cache_head,  # cache: [blocks, block_size, kv_heads, d]
    stride_table_seq,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr, DEPENDENT: tl.constexpr,
):
    # Dependent launch (kernels.py), except that the kernel after this one (o_proj) launches
    # only as this one ends. Launched early, during attention, o_proj left the gate/up matmul
    # after it 11 us slower (a timeline of one step; the cause is not pinned down): Llama-3-8B
    # INT4 at batch 1 took 3,350 us a step that way, 2,666 us this way, 2,870 us with no
    # dependent launch at all (session 7).
    if DEPENDENT:
        gdc_wait()
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)  # the query heads this KV head serves (padded to 16)
    head_mask = tl.arange(0, GROUP_PAD) < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
                mask=head_mask[:, None], other=0.0)  # [GROUP_PAD, D]
    running_max = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    running_sum = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    table = block_tables_ptr + seq * stride_table_seq
    for start in range(0, context_len, TILE):  # TILE keys (several cache blocks) per step
        keys = start + tl.arange(0, TILE)
        key_mask = keys < context_len
        running_max, running_sum, acc = _attend_to_keys(
            q, k_ptr, v_ptr, table, kv_head, keys, key_mask, key_mask[None, :], scale, running_max, running_sum, acc,
            stride_cache_block, stride_cache_slot, stride_cache_head, HEAD_DIM, BLOCK_SIZE)
    out = acc / running_sum[:, None]
    tl.store(out_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])


# Keys per step, warps, pipeline stages of the decode kernel, measured on an H100 by
# benchmarks/attention_decode.py: with few programs (a small batch) or small heads, 256 keys a
# step (fewer steps one after another: Llama-3-8B at batch 1, context 256: 8.7 -> 6.0 us;
# SmolLM2, context 2,048: 38.6 -> 18.3 us); with many programs of 128-wide heads, 64 keys.
LONG_TILE = (256, 8, 2)
SHORT_TILE = (64, 4, 3)


def decode_tile(programs: int, head_dim: int, device: torch.device) -> tuple[int, int, int]:
    """(keys per step, warps, stages) for `programs` (sequences x KV heads) of `head_dim`."""
    few = programs < 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return LONG_TILE if head_dim <= 64 or few else SHORT_TILE


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """q: [seqs, heads, head_dim] (head_dim contiguous) -> [seqs, heads, head_dim].
    `tile`: (keys per step, warps, stages); by default `decode_tile`'s choice."""
    seqs, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    keys, num_warps, num_stages = tile or decode_tile(seqs * kv_heads, head_dim, q.device)
    group = heads // kv_heads
    out = torch.empty((seqs, heads, head_dim), dtype=q.dtype, device=q.device)
    dependent = dependent_launch(q.device)
    _paged_decode_kernel[(seqs, kv_heads)](
        q, k_cache, v_cache, out, block_tables, context_lens, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 16), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        TILE=keys, num_warps=num_warps, num_stages=num_stages, DEPENDENT=dependent,
        launch_pdl=dependent,
    )
    return out


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, query_start_ptr, context_lens_ptr, block_tables_ptr, scale,
    stride_q_token, stride_q_head, stride_o_token, stride_o_head,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_table_seq,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DEPENDENT: tl.constexpr,
):
    wait_for_previous_kernel(DEPENDENT)
    seq = tl.program_id(0)
    query_block = tl.program_id(1)
    head = tl.program_id(2)
    query_start = tl.load(query_start_ptr + seq)
    num_queries = tl.load(query_start_ptr + seq + 1) - query_start
    if query_block * BLOCK_M >= num_queries:
        return
    context_len = tl.load(context_lens_ptr + seq)
    first_position = context_len - num_queries  # position of the sequence's first query
    rows = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_queries
    positions = first_position + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (query_start + rows)[:, None] * stride_q_token + head * stride_q_head + dims[None, :],
                mask=row_mask[:, None], other=0.0)  # [BLOCK_M, D]
    kv_head = head // GROUP
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    last_key = tl.minimum(context_len, first_position + (query_block + 1) * BLOCK_M)  # causal limit
    table = block_tables_ptr + seq * stride_table_seq
    for start in range(0, last_key, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_mask = keys < last_key
        visible = (keys[None, :] <= positions[:, None]) & key_mask[None, :]
        running_max, running_sum, acc = _attend_to_keys(
            q, k_ptr, v_ptr, table, kv_head, keys, key_mask, visible, scale, running_max, running_sum, acc,
            stride_cache_block, stride_cache_slot, stride_cache_head, HEAD_DIM, BLOCK_SIZE)
    out = acc / running_sum[:, None]
    tl.store(out_ptr + (query_start + rows)[:, None] * stride_o_token + head * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, query_start: torch.Tensor,
                            max_queries: int, scale: float) -> torch.Tensor:
    """q: [tokens, heads, head_dim], sequences back to back (query_start: [seqs + 1] offsets);
    each sequence's queries are its last positions (context_lens [seqs]). -> [tokens, heads, head_dim]."""
    tokens, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    out = torch.empty((tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    block_m, block_n = 64, 64
    grid = (context_lens.shape[0], triton.cdiv(max_queries, block_m), heads)
    dependent = dependent_launch(q.device)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, out, query_start, context_lens, block_tables, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4, num_stages=2, DEPENDENT=dependent, launch_pdl=dependent,
    )
    return out
