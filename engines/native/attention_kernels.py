"""Attention over the paged KV cache in Triton (imported only when running on CUDA). Softmax in fp32.

Cache layout: [blocks, block_size, kv_heads, head_dim]; a sequence's block table lists its
blocks in order, so token position p lives in block table[p // block_size], slot p % block_size.

- rope_cache_and_decode_attention: a decode step's attention in one kernel, one query per
  sequence: one program per (sequence, KV head) rotates the query heads of that KV head (GQA,
  padded to 16 rows for the tensor cores) and the new key (RoPE), writes the new key and value
  into their cache slot, and attends over the sequence's own blocks up to its context length
  (so a block table padded for CUDA graphs costs nothing), 256 keys a step at small batches so
  that few steps run one after another. Under dependent launch the first keys' cache lines are
  brought into L2 while the qkv matmul finishes, and at small batches o_proj launches as this
  kernel starts, to load its first weights beside it. When those programs are too few to fill the
  SMs (small batches), a long context is cut into chunks, one program each, merged by the last
  to finish (flash-decoding; Llama-3-8B at batch 1 and 8,192 tokens: 24 us against 100).
- paged_prefill_attention: variable-length prompts in one launch, flash-attention style: one
  program per (sequence, BLOCK_M queries, head); keys stream from the cache in BLOCK_N tiles
  up to the causal limit, with a running max and sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engines.native.carveout import share_decode_configuration
from engines.native.kernels import SplitBuffers, dependent_launch, sm_count, wait_for_previous_kernel


@triton.jit
def _softmax_step(scores, v, running_max, running_sum, acc):
    """One online-softmax step: scores [rows, keys] (fp32, -inf where a query may not look) and
    the keys' values v [keys, D] folded into the running max, sum and weighted values."""
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    correction = tl.exp(running_max - new_max)
    weights = tl.exp(scores - new_max[:, None])
    running_sum = running_sum * correction + tl.sum(weights, axis=1)
    acc = acc * correction[:, None] + tl.dot(weights.to(v.dtype), v)
    return new_max, running_sum, acc


@triton.jit
def _cache_offsets(table, kv_head, keys, key_mask, stride_cache_block, stride_cache_slot, stride_cache_head,
                   BLOCK_SIZE: tl.constexpr):
    """Where `keys` (positions) of one KV head live in the cache, through the block table."""
    blocks = tl.load(table + keys // BLOCK_SIZE, mask=key_mask, other=0)
    return blocks * stride_cache_block + (keys % BLOCK_SIZE) * stride_cache_slot + kv_head * stride_cache_head


@triton.jit
def _attend_to_keys(q, k_ptr, v_ptr, table, kv_head, keys, key_mask, visible, scale, running_max, running_sum, acc,
                    stride_cache_block, stride_cache_slot, stride_cache_head,
                    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One online-softmax step of queries q [rows, D] over `keys` (positions), read from the cache
    through the sequence's block table; `visible` [rows, keys] masks what each query may see."""
    dims = tl.arange(0, HEAD_DIM)
    offsets = _cache_offsets(table, kv_head, keys, key_mask, stride_cache_block, stride_cache_slot,
                             stride_cache_head, BLOCK_SIZE)
    k = tl.load(k_ptr + offsets[:, None] + dims[None, :], mask=key_mask[:, None], other=0.0)  # [keys, D]
    v = tl.load(v_ptr + offsets[:, None] + dims[None, :], mask=key_mask[:, None], other=0.0)
    scores = tl.where(visible, tl.dot(q, tl.trans(k)) * scale, float("-inf"))  # [rows, keys] fp32
    return _softmax_step(scores, v, running_max, running_sum, acc)


@triton.jit
def _rotated(pointers, partner_pointers, mask, cos, sin):
    """RoPE (rotate-half) of the vectors at `pointers` along their last dim d: x cos + x' sin,
    with x' the value half a head away (`partner_pointers`) and `sin` negated on the first
    half (the caller's); fp32."""
    x = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(partner_pointers, mask=mask, other=0.0).to(tl.float32)
    return x * cos + partner * sin


@triton.jit
def _prefetch_to_l2(pointers, mask):
    """Bring the lines at `pointers` into L2 (no registers held, nothing waited for)."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                              "=r,l,r", [pointers, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _rope_cache_and_decode_kernel(
    qkv_ptr, cos_ptr, sin_ptr, slot_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, context_lens_ptr, scale,
    workspace_ptr, counters_ptr,  # SPLITS > 1: partial results [seqs, kv heads, splits, ...] and arrivals
    stride_qkv, stride_angle, stride_o_seq, stride_o_head,  # qkv: [seqs, (heads + 2 kv_heads) d]; out: [seqs, heads, d]
    stride_cache_block, stride_cache_slot, stride_cache_head,  # cache: [blocks, block_size, kv_heads, d]
    stride_table_seq,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, SPLITS: tl.constexpr, DEPENDENT: tl.constexpr,
    LAUNCH_NEXT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    GROUP: tl.constexpr = NUM_HEADS // NUM_KV_HEADS
    HALF: tl.constexpr = HEAD_DIM // 2
    dims = tl.arange(0, HEAD_DIM)
    partner = (dims + HALF) % HEAD_DIM  # rotate-half pairs dim d with d +- HALF
    # The context is cut into `active` chunks of whole tiles, at most SPLITS (one tile's worth
    # at least, so a short context is one chunk: the kernel without splits); program `split`
    # attends to chunk `split` and the last one also writes the new key and value.
    context_len = tl.load(context_lens_ptr + seq)
    chunk = tl.cdiv(tl.cdiv(context_len, SPLITS), TILE) * TILE
    active = tl.cdiv(context_len, chunk)
    if split >= active:
        return
    chunk_start = split * chunk
    chunk_end = tl.minimum(chunk_start + chunk, context_len)
    owner = split == active - 1  # its chunk holds the new token
    # Before the wait, what the qkv matmul does not write: the step's metadata and angles, and
    # the chunk's first tile of keys cached by earlier steps brought into L2 (off the critical path).
    table = block_tables_ptr + seq * stride_table_seq
    first_keys = chunk_start + tl.arange(0, TILE)
    cached = first_keys < tl.minimum(chunk_end, context_len - 1)
    LINES: tl.constexpr = max(HEAD_DIM // 64, 1)  # 128-byte lines a 16-bit head spans
    line = tl.arange(0, LINES) * 64
    offsets = _cache_offsets(table, kv_head, first_keys, cached, stride_cache_block, stride_cache_slot,
                             stride_cache_head, BLOCK_SIZE)[:, None] + line[None, :]
    in_cache = tl.broadcast_to(cached[:, None], (TILE, LINES))
    _prefetch_to_l2(k_ptr + offsets, in_cache)
    _prefetch_to_l2(v_ptr + offsets, in_cache)
    cos = tl.load(cos_ptr + seq * stride_angle + dims % HALF)
    sin = tl.load(sin_ptr + seq * stride_angle + dims % HALF)
    sin = tl.where(dims < HALF, -sin, sin)
    slot = tl.load(slot_ptr + seq)
    # Dependent launch (kernels.py). LAUNCH_NEXT: the kernel after this one (o_proj) launches now,
    # so that its programs load their first weights while this one works; otherwise as it ends.
    # That pays only with this kernel in the decode kernels' shared-memory configuration
    # (carveout.py): Llama-3-8B INT4 batch-1 step 2,412 -> 2,380 us (session 19). In Triton's
    # (228 KB, 28 KB of L1), o_proj and the matmuls after it ran on those SMs with that little L1:
    # 2,929 against 2,418 us (3,335 against 2,581 in session 9).
    if LAUNCH_NEXT:
        gdc_launch_dependents()
    if DEPENDENT:
        gdc_wait()

    # The query heads this KV head serves (padded to 16 rows for the tensor cores), rotated;
    # this KV head's new k (rotated) and v into their cache slot, where the loop reads them.
    row = qkv_ptr + seq * stride_qkv
    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    head_mask = (tl.arange(0, GROUP_PAD) < GROUP)[:, None]
    q = _rotated(row + heads[:, None] * HEAD_DIM + dims[None, :], row + heads[:, None] * HEAD_DIM + partner[None, :],
                 head_mask, cos[None, :], sin[None, :]).to(k_ptr.dtype.element_ty)
    if owner:
        k_row = row + (NUM_HEADS + kv_head) * HEAD_DIM
        new_k = _rotated(k_row + dims, k_row + partner, dims < HEAD_DIM, cos, sin)
        target = slot * stride_cache_slot + kv_head * stride_cache_head  # slot = block * BLOCK_SIZE + offset
        tl.store(k_ptr + target + dims, new_k.to(k_ptr.dtype.element_ty))
        tl.store(v_ptr + target + dims, tl.load(row + (NUM_HEADS + NUM_KV_HEADS + kv_head) * HEAD_DIM + dims))
        tl.debug_barrier()  # the program's own cache writes are in before its threads read the keys

    running_max = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    running_sum = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    for start in range(chunk_start, chunk_end, TILE):  # TILE keys (several cache blocks) per step
        keys = start + tl.arange(0, TILE)
        key_mask = keys < chunk_end
        running_max, running_sum, acc = _attend_to_keys(
            q, k_ptr, v_ptr, table, kv_head, keys, key_mask, key_mask[None, :], scale, running_max, running_sum, acc,
            stride_cache_block, stride_cache_slot, stride_cache_head, HEAD_DIM, BLOCK_SIZE)
    out_rows = out_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + dims[None, :]
    if SPLITS == 1:
        tl.store(out_rows, (acc / running_sum[:, None]).to(out_ptr.dtype.element_ty), mask=head_mask)
    elif active == 1:
        tl.store(out_rows, (acc / running_sum[:, None]).to(out_ptr.dtype.element_ty), mask=head_mask)
    else:
        _merge_chunks(acc, running_max, running_sum, out_rows, head_mask, workspace_ptr, counters_ptr,
                      seq * NUM_KV_HEADS + kv_head, split, active, SPLITS, GROUP_PAD, HEAD_DIM)


@triton.jit
def _merge_chunks(acc, running_max, running_sum, out_rows, head_mask, workspace_ptr, counters_ptr, pair, split,
                  active, SPLITS: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Split context: each chunk's softmax state (weighted values, max, sum) goes to the
    workspace; the program that arrives last (a counter per sequence and KV head) merges the
    `active` chunks into the output and leaves the counter at zero for the next call."""
    PARTIAL: tl.constexpr = GROUP_PAD * HEAD_DIM + 2 * GROUP_PAD  # floats per chunk
    rows = tl.arange(0, GROUP_PAD)
    cells = rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    mine = workspace_ptr + (pair * SPLITS + split) * PARTIAL
    tl.store(mine + cells, acc)
    tl.store(mine + GROUP_PAD * HEAD_DIM + rows, running_max)
    tl.store(mine + GROUP_PAD * HEAD_DIM + GROUP_PAD + rows, running_sum)
    tl.debug_barrier()  # every thread's stores are in before the counter moves
    arrived = tl.atomic_add(counters_ptr + pair, 1, sem="acq_rel")
    if arrived == active - 1:  # the last chunk in: merge them all
        tl.debug_barrier()
        total_max = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        for chunk in range(0, active):
            chunk_max = tl.load(workspace_ptr + (pair * SPLITS + chunk) * PARTIAL + GROUP_PAD * HEAD_DIM + rows,
                                cache_modifier=".cg")  # from L2, where the other programs' stores landed
            total_max = tl.maximum(total_max, chunk_max)
        merged = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
        total_sum = tl.zeros((GROUP_PAD,), tl.float32)
        for chunk in range(0, active):
            theirs = workspace_ptr + (pair * SPLITS + chunk) * PARTIAL
            weight = tl.exp(tl.load(theirs + GROUP_PAD * HEAD_DIM + rows, cache_modifier=".cg") - total_max)
            total_sum += weight * tl.load(theirs + GROUP_PAD * HEAD_DIM + GROUP_PAD + rows, cache_modifier=".cg")
            merged += weight[:, None] * tl.load(theirs + cells, cache_modifier=".cg")
        tl.store(counters_ptr + pair, 0)
        tl.store(out_rows, (merged / total_sum[:, None]).to(out_rows.dtype.element_ty), mask=head_mask)


# Keys per step, warps, pipeline stages of the decode kernel, measured on an H100 by
# benchmarks/attention_decode.py: with few programs (a small batch) or small heads, 256 keys a
# step (fewer steps one after another; session 4, attention alone: Llama-3-8B at batch 1,
# context 256: 8.7 -> 6.0 us; SmolLM2, context 2,048: 38.6 -> 18.3 us); with many programs of
# 128-wide heads, 64 keys. With rope and the cache write in the kernel (session 8) these stay
# the best or within 6%.
LONG_TILE = (256, 8, 2)
SHORT_TILE = (64, 4, 3)


def decode_tile(programs: int, head_dim: int, device: torch.device) -> tuple[int, int, int]:
    """(keys per step, warps, stages) for `programs` (sequences x KV heads) of `head_dim`."""
    few = programs < 2 * sm_count(device.index)
    return LONG_TILE if head_dim <= 64 or few else SHORT_TILE


MAX_SPLITS = 16

# Up to this many sequences the kernel lets o_proj launch as it starts (LAUNCH_NEXT): o_proj is then
# the INT4 skinny kernel or GEMV (int4_kernels.SKINNY_ROWS, GEMV_MAX_ROWS), which run in this kernel's
# shared-memory configuration (carveout.py), or cuBLAS, which does not launch early. Beyond, the
# INT4 wgmma kernel's configuration differs and early launch was not measured.
LAUNCH_NEXT_MAX_SEQS = 8


def context_splits(programs: int, device: torch.device) -> int:
    """Chunks a long context is cut into for `programs` (sequences x KV heads): enough programs
    to fill the SMs, at most MAX_SPLITS (one chunk whenever the programs already fill them)."""
    return max(1, min(MAX_SPLITS, sm_count(device.index) // programs))


_merge_buffers = SplitBuffers()  # split-context attention: chunks' softmax states and arrivals


def rope_cache_and_decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                    slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                    block_tables: torch.Tensor, context_lens: torch.Tensor, num_heads: int,
                                    scale: float, tile: tuple[int, int, int] | None = None,
                                    splits: int | None = None) -> torch.Tensor:
    """One decode step's attention in one kernel: rotate q and k (RoPE), write k and v into their
    cache slots, attend from q to the sequence's cached keys and the new one.

    qkv: [seqs, (heads + 2 * kv_heads) * head_dim] (q, then k, then v; one token per sequence);
    cos/sin: fp32 [seqs, head_dim / 2]; caches: [blocks, block_size, kv_heads, head_dim].
    Returns [seqs, heads, head_dim]. `tile`: (keys per step, warps, stages), else `decode_tile`'s;
    `splits`: the most chunks a context is cut into, else `context_splits`'."""
    seqs = qkv.shape[0]
    _, block_size, kv_heads, head_dim = k_cache.shape
    keys, num_warps, num_stages = tile or decode_tile(seqs * kv_heads, head_dim, qkv.device)
    splits = splits or context_splits(seqs * kv_heads, qkv.device)
    group_pad = max(triton.next_power_of_2(num_heads // kv_heads), 16)
    out = torch.empty((seqs, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    workspace, counters = out, out  # untouched without splits
    if splits > 1:
        workspace, counters = _merge_buffers.get(qkv.device, seqs * kv_heads * splits * group_pad * (head_dim + 2),
                                                 seqs * kv_heads)
    dependent = dependent_launch(qkv.device)
    share_decode_configuration(_rope_cache_and_decode_kernel[(seqs, kv_heads, splits)](
        qkv, cos, sin, slot_mapping, k_cache, v_cache, out, block_tables, context_lens, scale, workspace, counters,
        qkv.stride(0), cos.stride(0), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=kv_heads, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        TILE=keys, SPLITS=splits, num_warps=num_warps, num_stages=num_stages, DEPENDENT=dependent,
        LAUNCH_NEXT=dependent and seqs <= LAUNCH_NEXT_MAX_SEQS, launch_pdl=dependent,
    ))
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
