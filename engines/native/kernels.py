"""Small fused Triton kernels for the native engine on NVIDIA GPUs (imported only on CUDA).

Each replaces several torch kernels: at batch 1 a decode step is hundreds of launches, and
a launch costs microseconds whatever it does. Attention is in attention_kernels.py, the
INT4 matmul in int4_kernels.py.

Dependent launch (PDL, Hopper and later): the decode path's kernels are launched so that each
may start while the kernel before it in the stream is still finishing, and each waits for
that kernel (`wait_for_previous_kernel`) only before it touches anything that kernel may
write or read: activations, the KV cache, workspaces, its own output. What comes before the
wait is launch, setup and reads of what no kernel of the step writes: in the INT4 kernels the
first loads of their own weights, in decode attention the step's metadata and the keys
earlier steps cached. A kernel lets the next one launch right after its wait; the next one then
starts on the SMs this one leaves, while its last programs finish. Decode attention lets o_proj
launch before its wait, at up to 8 sequences, since both run in one shared-memory configuration
(carveout.py).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engines.native.sequence import NAN_LOGITS

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter: no inline asm, no PDL

# LOWBIT_DEPENDENT_LAUNCH=0 launches every kernel only after the one before it has finished
# (the benchmarks compare both; a process-wide switch, read at launch time).
DEPENDENT_LAUNCH = os.environ.get("LOWBIT_DEPENDENT_LAUNCH", "1") != "0"


class SplitBuffers:
    """A workspace (fp32) and arrival counters (int32) per device, for kernels whose programs
    share work and let the last one to arrive finish it (INT4 split-K, split-context attention).

    Every call leaves both at zero, so one pair serves all layers of a stream in turn. They
    only grow outside CUDA-graph capture (the warm-up before a capture runs the same shapes),
    and a grown-out pair is kept alive: graphs captured earlier still point at it."""

    def __init__(self):
        self._by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def get(self, device: torch.device, workspace: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = self._by_device.setdefault(device, [])
        if pairs and pairs[-1][0].numel() >= workspace and pairs[-1][1].numel() >= counters:
            return pairs[-1]
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a split workspace must grow before CUDA-graph capture: run the shape once first")
        old = pairs[-1] if pairs else None
        pairs.append((torch.zeros(max(workspace, old[0].numel() if old else 0), dtype=torch.float32, device=device),
                      torch.zeros(max(counters, old[1].numel() if old else 0), dtype=torch.int32, device=device)))
        return pairs[-1]


@functools.cache
def _hopper_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


@functools.cache
def sm_count(device: int | None = None) -> int:
    """The streaming multiprocessors of CUDA device `device` (the current one if None)."""
    properties = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
    return properties.multi_processor_count


def dependent_launch(device: torch.device) -> bool:
    """Whether kernels on `device` launch dependent (PDL; module docstring): on Hopper and
    later GPUs, not under Triton's interpreter, and not switched off."""
    return (DEPENDENT_LAUNCH and device.type == "cuda" and not INTERPRETED
            and _hopper_or_later(device.index if device.index is not None else torch.cuda.current_device()))


@triton.jit
def wait_for_previous_kernel(DEPENDENT: tl.constexpr):
    """Under dependent launch: wait until the kernel before this one has finished and its
    writes are visible, then let the kernel after this one launch. Nothing otherwise."""
    if DEPENDENT:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, stride_row, size, eps, BLOCK: tl.constexpr,
                     DEPENDENT: tl.constexpr):
    wait_for_previous_kernel(DEPENDENT)
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
    dependent = dependent_launch(x.device)
    _rms_norm_kernel[(x.shape[0],)](x, weight, out, x.stride(0), x.shape[1], eps,
                                    BLOCK=triton.next_power_of_2(x.shape[1]), num_warps=8, DEPENDENT=dependent,
                                    launch_pdl=dependent)
    return out


@triton.jit
def _embed_and_rotary_kernel(ids_ptr, flags_ptr, fed_ptr, positions_ptr, inv_freq_ptr, table_ptr, x_ptr, cos_ptr,
                             sin_ptr, hidden, stride_table, half, FED: tl.constexpr, BLOCK_H: tl.constexpr,
                             BLOCK_D: tl.constexpr, DEPENDENT: tl.constexpr):
    """One token a program: its row of the embedding table (its id taken from `fed` where its flag
    is set) and RoPE's cos and sin of its position times each inverse frequency."""
    wait_for_previous_kernel(DEPENDENT)
    row = tl.program_id(0)
    token = tl.load(ids_ptr + row)
    if FED:
        token = tl.where(tl.load(flags_ptr + row) != 0, tl.load(fed_ptr + row), token)
    # A NAN_LOGITS (-1) fed back from the step before reads row 0, not the memory before the table
    # (that sequence's row of this step is thrown away).
    token = tl.maximum(token, 0)
    for start in range(0, hidden, BLOCK_H):
        columns = start + tl.arange(0, BLOCK_H)
        mask = columns < hidden
        tl.store(x_ptr + row * hidden + columns, tl.load(table_ptr + token * stride_table + columns, mask=mask),
                 mask=mask)
    dims = tl.arange(0, BLOCK_D)
    mask = dims < half
    angles = tl.load(positions_ptr + row).to(tl.float32) * tl.load(inv_freq_ptr + dims, mask=mask, other=0.0)
    # libdevice's cosf and sinf, as torch uses: an approximate cosine is off at the angles of long
    # contexts (position x the highest frequency, 1: up to 1.3e5 radians at 131,072 tokens).
    tl.store(cos_ptr + row * half + dims, libdevice.cos(angles), mask=mask)
    tl.store(sin_ptr + row * half + dims, libdevice.sin(angles), mask=mask)


def embed_and_rotary_tables(table: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                            inv_freq: torch.Tensor, fed: tuple[torch.Tensor, torch.Tensor] | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's first kernel: (embedding rows [tokens, hidden], cos and sin fp32 [tokens, head_dim / 2])
    for int64 `input_ids` and `positions`; `fed` = (flags, ids): rows whose flag is set take their
    id from `ids` (a captured decode step, the previous step's tokens). One launch instead of
    torch's seven (select, cast, multiply, cos, sin, gather)."""
    tokens, (_, hidden), half = input_ids.shape[0], table.shape, inv_freq.shape[0]
    x = torch.empty((tokens, hidden), dtype=table.dtype, device=table.device)
    cos = torch.empty((tokens, half), dtype=torch.float32, device=table.device)
    sin = torch.empty_like(cos)
    flags, fed_ids = fed if fed is not None else (input_ids, input_ids)
    dependent = dependent_launch(table.device)
    _embed_and_rotary_kernel[(tokens,)](
        input_ids, flags, fed_ids, positions, inv_freq, table, x, cos, sin, hidden, table.stride(0), half,
        FED=fed is not None, BLOCK_H=min(4096, triton.next_power_of_2(hidden)), BLOCK_D=triton.next_power_of_2(half),
        DEPENDENT=dependent, num_warps=4, launch_pdl=dependent)
    return x, cos, sin


@triton.jit
def _rope_and_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
                           stride_token, stride_angle, stride_slot,
                           NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                           DEPENDENT: tl.constexpr):
    wait_for_previous_kernel(DEPENDENT)
    token = tl.program_id(0)
    head = tl.program_id(1)  # 0..NUM_HEADS-1: a query head; then the KV heads
    index = tl.arange(0, HALF)
    base = qkv_ptr + token * stride_token + head * 2 * HALF
    x1 = tl.load(base + index).to(tl.float32)
    x2 = tl.load(base + HALF + index).to(tl.float32)
    cos = tl.load(cos_ptr + token * stride_angle + index)
    sin = tl.load(sin_ptr + token * stride_angle + index)
    rotated1 = (x1 * cos - x2 * sin).to(qkv_ptr.dtype.element_ty)
    rotated2 = (x2 * cos + x1 * sin).to(qkv_ptr.dtype.element_ty)
    if head < NUM_HEADS:
        tl.store(base + index, rotated1)
        tl.store(base + HALF + index, rotated2)
    else:
        kv_head = head - NUM_HEADS
        target = tl.load(slot_ptr + token) * stride_slot + kv_head * 2 * HALF
        tl.store(k_cache_ptr + target + index, rotated1)
        tl.store(k_cache_ptr + target + HALF + index, rotated2)
        value = base + NUM_KV_HEADS * 2 * HALF  # this KV head's V, after all the K heads
        tl.store(v_cache_ptr + target + index, tl.load(value + index))
        tl.store(v_cache_ptr + target + HALF + index, tl.load(value + HALF + index))


def rope_and_cache_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int) -> None:
    """One kernel for four jobs: rotate q in place, rotate k, write k and v into their cache slots
    (prefill; a decode step does this inside its attention kernel, attention_kernels.py).

    qkv: [tokens, (heads + 2 * kv_heads) * head_dim] (contiguous, q then k then v);
    cos/sin fp32 [tokens, head_dim/2]; caches [blocks, block_size, kv_heads, head_dim].
    """
    _, _, kv_heads, head_dim = k_cache.shape
    dependent = dependent_launch(qkv.device)
    _rope_and_cache_kernel[(qkv.shape[0], num_heads + kv_heads)](
        qkv, cos, sin, slot_mapping, k_cache, v_cache, qkv.stride(0), cos.stride(0), kv_heads * head_dim,
        NUM_HEADS=num_heads, NUM_KV_HEADS=kv_heads, HALF=head_dim // 2, num_warps=1, DEPENDENT=dependent,
        launch_pdl=dependent)


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, size, BLOCK: tl.constexpr,
                         DEPENDENT: tl.constexpr):
    wait_for_previous_kernel(DEPENDENT)
    row = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = columns < size
    gate = tl.load(gate_up_ptr + row * stride_in + columns, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + size + columns, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + columns, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty),
             mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[tokens, 2 * I] (gate then up) -> silu(gate) * up [tokens, I], in one kernel."""
    tokens, width = gate_up.shape
    size = width // 2
    out = torch.empty((tokens, size), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    dependent = dependent_launch(gate_up.device)
    _silu_and_mul_kernel[(tokens, triton.cdiv(size, block))](gate_up, out, gate_up.stride(0), out.stride(0), size,
                                                            BLOCK=block, num_warps=4, DEPENDENT=dependent,
                                                            launch_pdl=dependent)
    return out


_NAN_LOGITS = tl.constexpr(NAN_LOGITS)


@triton.jit
def _first_maximum(values, offsets, SIZE: tl.constexpr):
    """(value, offset) of the first maximum of a 1-D block, NaN counting as the largest, as in
    torch.argmax. (A comparison with NaN is false, so a plain max over a block holding one may
    answer any offset: a padding column past the vocabulary, say, whose token id would then index
    past the embedding table in the next step.)"""
    is_nan = values != values
    first_nan = tl.min(tl.where(is_nan, offsets, SIZE), axis=0)
    value, index = tl.max(tl.where(is_nan, float("-inf"), values), axis=0, return_indices=True,
                          return_indices_tie_break_left=True)
    has_nan = first_nan < SIZE
    return tl.where(has_nan, float("nan"), value), tl.where(has_nan, first_nan, index)


@triton.jit
def _chunk_argmax_kernel(logits_ptr, values_ptr, indices_ptr, stride_row, size, CHUNK: tl.constexpr,
                         DEPENDENT: tl.constexpr):
    """The first maximum of one CHUNK of one row: its value and column, into [rows, chunks] buffers."""
    wait_for_previous_kernel(DEPENDENT)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offsets = tl.arange(0, CHUNK)
    columns = chunk * CHUNK + offsets
    values = tl.load(logits_ptr + row * stride_row + columns, mask=columns < size, other=float("-inf"))
    value, index = _first_maximum(values, offsets, CHUNK)
    tl.store(values_ptr + row * tl.num_programs(1) + chunk, value)
    tl.store(indices_ptr + row * tl.num_programs(1) + chunk, chunk * CHUNK + index.to(tl.int64))


@triton.jit
def _argmax_of_chunks_kernel(values_ptr, indices_ptr, out_ptr, chunks, BLOCK: tl.constexpr,
                             DEPENDENT: tl.constexpr):
    """Each row's first maximum from its chunks' (the earliest chunk wins a tie, as torch.argmax),
    or NAN_LOGITS where it is a NaN."""
    wait_for_previous_kernel(DEPENDENT)
    row = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    values = tl.load(values_ptr + row * chunks + offsets, mask=offsets < chunks, other=float("-inf"))
    value, best = _first_maximum(values, offsets, BLOCK)
    index = tl.load(indices_ptr + row * chunks + best)
    tl.store(out_ptr + row, tl.where(value != value, _NAN_LOGITS, index))


ARGMAX_CHUNK = 2048


def argmax_rows(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """logits [rows, vocab] (float32, vocab contiguous) -> int64 [rows], the first maximum of each row:
    torch.argmax's answer, except NAN_LOGITS for a row holding a NaN (sampler.greedy_tokens's
    answer; torch's reduction took 13-28 us for a 49k-128k vocab). Two kernels: the
    maximum of each chunk of ARGMAX_CHUNK columns, all at once, then of the chunks' (one program a
    row reading the whole row took 29 us for Llama 3's vocab at batch 1). `out`: an int64 [rows]
    to write them into."""
    rows, size = logits.shape
    chunks = triton.cdiv(size, ARGMAX_CHUNK)
    values = torch.empty((rows, chunks), dtype=torch.float32, device=logits.device)
    indices = torch.empty((rows, chunks), dtype=torch.int64, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device) if out is None else out
    dependent = dependent_launch(logits.device)
    _chunk_argmax_kernel[(rows, chunks)](logits, values, indices, logits.stride(0), size, CHUNK=ARGMAX_CHUNK,
                                         num_warps=4, DEPENDENT=dependent, launch_pdl=dependent)
    _argmax_of_chunks_kernel[(rows,)](values, indices, out, chunks, BLOCK=triton.next_power_of_2(chunks),
                                      num_warps=1, DEPENDENT=dependent, launch_pdl=dependent)
    return out
