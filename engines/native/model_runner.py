"""Owns every tensor of the native engine: weights, the paged KV cache, step inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engines.base import SamplingParams
from engines.native.model import (
    NAMED_SHAPES,
    AttentionMetadata,
    LlamaConfig,
    build_model,
    random_state,
    read_checkpoint,
)
from engines.native.sampler import Sampler, greedy_tokens
from engines.native.sequence import Sequence


@dataclass(frozen=True)
class RunnerConfig:
    device: str = "cpu"
    dtype: str = "float32"  # "bfloat16" on GPUs
    block_size: int = 16
    kv_cache_tokens: int = 32768  # KV-cache capacity, in tokens
    cuda_graphs: bool = True  # on CUDA: replay captured decode steps instead of launching each kernel
    max_context_tokens: int = 8192  # longest sequence a captured decode step serves
    quantize: str | None = None  # "int4": RTN-quantize a dense checkpoint's linear layers as it loads
    quantize_lm_head: bool = False  # RTN-quantize the LM head to INT4 too (it stays dense otherwise)


# The ladder of captured decode batch sizes: a batch runs in the smallest that holds it.
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


class ModelRunner:
    def __init__(self, config: RunnerConfig, checkpoint: str | Path | None = None, shape: str | None = None,
                 state: dict[str, torch.Tensor] | None = None):
        """Weights from a checkpoint directory, or a named shape with `state` (or random weights)."""
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        model_config = LlamaConfig.from_checkpoint(checkpoint) if checkpoint else NAMED_SHAPES[shape]
        self.model_config = model_config
        if checkpoint:
            state = read_checkpoint(checkpoint)
        elif state is None:
            state = random_state(model_config, self.device, self.dtype)
        with torch.inference_mode():
            self.model = build_model(model_config, dict(state), self.device, self.dtype, config.quantize,
                                     config.quantize_lm_head)
        self.num_blocks = max(1, config.kv_cache_tokens // config.block_size)
        # One more block than the block manager hands out: padding rows of a captured decode
        # step write their K/V there, never into a real sequence's blocks.
        self.scratch_block = self.num_blocks
        self._allocate_kv_cache()
        self.sampler = Sampler()
        self._token_buffers = _TokenBuffers()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict]] = {}
        self._graph_pool = None
        self.use_graphs = config.cuda_graphs and self.device.type == "cuda"

    def weight_format(self) -> str:
        """As /v1/models shows it: "int4-w4a16" when the linear layers are INT4, else the dtype."""
        from engines.native.linear import Int4Linear

        if any(isinstance(module, Int4Linear) for module in self.model.modules()):
            return "int4-w4a16"
        return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(self.config.dtype, self.config.dtype)

    def _allocate_kv_cache(self) -> None:
        c = self.model_config
        shape = (self.num_blocks + 1, self.config.block_size, c.num_key_value_heads, c.dim_per_head)
        for layer in self.model.layers:
            layer.self_attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.self_attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        """One step: prefill (all uncomputed tokens) or decode (the last token) -> next tokens."""
        if not is_prefill and self._graph_serves(seqs, ahead=False):
            logits, greedy, _ = self._decode_with_graph(seqs, None)
        else:
            logits, greedy = self.logits(seqs, is_prefill), None
        return self.sampler.sample(logits, [seq.seq_id for seq in seqs], [seq.sampling for seq in seqs], greedy)

    @torch.inference_mode()
    def launch_decode(self, seqs: list[Sequence], after: PendingTokens | None = None) -> PendingTokens:
        """A greedy decode step, launched without waiting for it: its tokens come from the
        returned PendingTokens. `after`: a step of the same sequences (same order) still in
        flight, whose tokens this one takes as input on the device: each sequence's last token
        is then one past its `token_ids`, so this step runs before the host has read them."""
        if after is not None and after.count != len(seqs):
            raise ValueError(f"a step of {after.count} sequences cannot feed one of {len(seqs)}")
        if self._graph_serves(seqs, ahead=after is not None):
            _, greedy, source = self._decode_with_graph(seqs, after)
            return PendingTokens(greedy, self._token_buffers, source)
        logits = self.logits(seqs, is_prefill=False, ahead=after.on_device if after is not None else None)
        if self.device.type == "cuda":
            from engines.native.kernels import argmax_rows  # Triton: GPUs only

            return PendingTokens(argmax_rows(logits), self._token_buffers)
        return PendingTokens(greedy_tokens(logits), self._token_buffers)

    def _graph_serves(self, seqs: list[Sequence], ahead: bool) -> bool:
        return self.use_graphs and len(seqs) <= GRAPH_BATCH_SIZES[-1] \
            and max(seq.num_tokens for seq in seqs) + ahead <= self.config.max_context_tokens

    @torch.inference_mode()
    def warm_up(self, max_batch: int) -> list[int]:
        """On CUDA, before the first request: compile the kernels a request can need and capture
        the decode graphs for up to `max_batch` sequences, so that no request pays for them (the
        first chat through HTTP took 12.6 s on an H100 without this). The prefills cover every
        INT4 kernel choice by row count (up to 2, 8, 16, 64, 128 rows and beyond), each with a row
        count that is a multiple of 16 and one that is not (Triton compiles a kernel again for
        each); their K/V go to the scratch block, which no sequence owns. Returns the batch sizes
        captured."""
        if self.device.type != "cuda":
            return []
        block_size = self.config.block_size
        for length in (1, 3, 6, 13, 16, 40, 64, 100, 128, 200, 256):
            seq = Sequence("warm-up", [0] * length, SamplingParams(max_tokens=1))
            seq.block_table = [self.scratch_block] * ((length + block_size - 1) // block_size)
            self.logits([seq], is_prefill=True)
        captured = []
        if self.use_graphs:
            for bucket in GRAPH_BATCH_SIZES:
                if bucket not in self._graphs:
                    self._capture(bucket)
                captured.append(bucket)
                if bucket >= max_batch:
                    break
        torch.cuda.synchronize()
        return captured

    # --- CUDA graphs for decode ---------------------------------------------------------------

    def drop_graphs(self) -> None:
        """Forget the captured decode steps; each is captured again when next needed (after a
        change in how kernels launch, say: a graph replays the launches it captured)."""
        self._graphs.clear()
        self._graph_pool = None

    def _decode_with_graph(self, seqs: list[Sequence], after: PendingTokens | None,
                           ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Replays the captured step of the smallest bucket that holds `seqs` -> (logits, greedy
        tokens, which replay made them). `after`: a step still in flight whose tokens are this
        one's input (launch_decode)."""
        count = len(seqs)
        bucket = next(size for size in GRAPH_BATCH_SIZES if size >= count)
        graph, static = self._graphs.get(bucket) or self._capture(bucket)
        ahead = after is not None
        # The graph feeds itself the tokens of its previous replay when that replay was the step
        # before (the usual case); otherwise they are copied in. A copy or a kernel between two
        # replays costs far more than its own work (not pinned down; H100, SmolLM2 shape in
        # bf16, steps launched ahead: 1,077 us a step with the tokens copied in, 929 fed in the
        # graph; INT4 676 and 651: benchmarks/results/run_ahead_h100_2026-11-24_session10.txt).
        fed_in_graph = ahead and after.source == (bucket, static["replays"])
        block_size = self.config.block_size
        # All of the step's inputs in one pinned host buffer, one copy to the device:
        # [input ids | positions | slots | context lengths | fed (1: the input id is the graph's
        # previous token) | block tables (bucket x width)]. Two buffers, used in turn: a step
        # launched ahead fills one while the copy from the other may not have run yet.
        static["turn"] ^= 1
        pinned, host = static["pinned"][static["turn"]], static["host"][static["turn"]]
        host[:5 * bucket] = 0
        table = host[5 * bucket:].reshape(bucket, -1)
        table[:] = self.scratch_block  # padding rows attend to one token of the scratch block
        host[2 * bucket + count:3 * bucket] = self.scratch_block * block_size
        host[3 * bucket + count:4 * bucket] = 1
        for row, seq in enumerate(seqs):
            position = seq.num_tokens - 1 + ahead  # ahead: the last token is still on the device
            if not ahead:
                host[row] = seq.token_ids[position]
            host[bucket + row] = position
            host[2 * bucket + row] = seq.block_table[position // block_size] * block_size + position % block_size
            host[3 * bucket + row] = position + 1
            host[4 * bucket + row] = fed_in_graph
            table[row, :len(seq.block_table)] = seq.block_table
        static["inputs"].copy_(pinned, non_blocking=True)
        if ahead and not fed_in_graph:
            static["inputs"][:count].copy_(after.on_device)
        graph.replay()
        static["replays"] += 1
        return static["logits"][:count], static["greedy"][:count], (bucket, static["replays"])

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, dict]:
        width = (self.config.max_context_tokens + self.config.block_size - 1) // self.config.block_size
        inputs = torch.zeros(5 * bucket + bucket * width, dtype=torch.long, device=self.device)
        pinned = [torch.zeros(inputs.shape, dtype=torch.long, pin_memory=True) for _ in range(2)]
        static = {"inputs": inputs, "pinned": pinned, "host": [buffer.numpy() for buffer in pinned], "turn": 0,
                  "replays": 0}
        input_ids, positions, slots, lengths, fed = inputs[:5 * bucket].view(5, bucket)
        tables = inputs[5 * bucket:].view(bucket, width)
        slots.fill_(self.scratch_block * self.config.block_size)
        lengths.fill_(1)
        tables.fill_(self.scratch_block)
        meta = AttentionMetadata(False, slots, lengths, tables, [])
        # Kept in `static`: the graph reads these tensors' memory on every replay, so they must
        # outlive this function (a freed one would be reused by the allocator under the graph).
        # The step's greedy tokens, which the next replay takes as input where `fed` says so.
        greedy = static["greedy"] = torch.zeros(bucket, dtype=torch.long, device=self.device)

        def forward() -> torch.Tensor:
            return self.model(input_ids, positions, meta, fed=(fed, greedy))  # a logits row per sequence

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            forward()  # warm-up: compiles the Triton kernels, settles the allocator
        torch.cuda.current_stream().wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        from engines.native.kernels import argmax_rows  # Triton: GPUs only

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool), torch.inference_mode():
            static["logits"] = forward()
            argmax_rows(static["logits"], out=greedy)  # greedy rows need no other work
        self._graphs[bucket] = (graph, static)
        return graph, static

    @torch.inference_mode()
    def logits(self, seqs: list[Sequence], is_prefill: bool, every_position: bool = False,
               ahead: torch.Tensor | None = None) -> torch.Tensor:
        """The step's forward pass: float32 logits [seqs, vocab] at each sequence's last token
        (or, with `every_position`, at each of its tokens computed in this step). `ahead`
        (decode): the sequences' last tokens, on the device, one past their `token_ids`."""
        input_ids, positions, slots, query_start, last_index = [], [], [], [0], []
        block_size = self.config.block_size
        step_ahead = ahead is not None
        for seq in seqs:
            start = seq.num_computed_tokens if is_prefill else seq.num_tokens - 1 + step_ahead
            for position in range(start, seq.num_tokens + step_ahead):
                input_ids.append(seq.token_ids[position] if position < seq.num_tokens else 0)
                positions.append(position)
                slots.append(seq.block_table[position // block_size] * block_size + position % block_size)
            if every_position:
                last_index.extend(range(query_start[-1], len(input_ids)))
            else:
                last_index.append(len(input_ids) - 1)
            query_start.append(len(input_ids))
        width = max(len(seq.block_table) for seq in seqs)
        tables = np.zeros((len(seqs), width), dtype=np.int64)
        for row, seq in enumerate(seqs):
            tables[row, :len(seq.block_table)] = seq.block_table
        as_long = dict(dtype=torch.long, device=self.device)
        meta = AttentionMetadata(
            is_prefill=is_prefill,
            slot_mapping=torch.tensor(slots, **as_long),
            context_lens=torch.tensor([seq.num_tokens + step_ahead for seq in seqs], **as_long),
            block_tables=torch.from_numpy(tables).to(self.device),
            query_start=query_start,
            query_start_tensor=torch.tensor(query_start, **as_long) if is_prefill else None,
            max_query_len=max(end - start for start, end in zip(query_start, query_start[1:])),
        )
        token_ids = ahead.to(torch.long) if step_ahead else torch.tensor(input_ids, **as_long)  # NAN_LOGITS: model.py
        return self.model(token_ids, torch.tensor(positions, **as_long), meta, torch.tensor(last_index, **as_long))


class PendingTokens:
    """The greedy tokens of a decode step that may still be running on the device. They are
    copied to a pinned host buffer behind the step (two in turn, so that the next step's copy
    does not overwrite them before the host has read them); `tokens()` waits for them.
    `source`: (graph bucket, replay number) when a captured step made them."""

    def __init__(self, greedy: torch.Tensor, buffers: _TokenBuffers, source: tuple[int, int] | None = None):
        self.on_device = greedy
        self.count = len(greedy)
        self.source = source
        self._host = buffers.next(self.count, greedy.device)
        self._host.copy_(greedy, non_blocking=True)
        self._done = torch.cuda.Event() if greedy.device.type == "cuda" else None
        if self._done is not None:
            self._done.record()

    def tokens(self) -> list[int]:
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()


class _TokenBuffers:
    """Two host buffers for PendingTokens, used in turn (pinned on CUDA)."""

    def __init__(self):
        self._buffers: list[torch.Tensor] = []
        self._turn = 0

    def next(self, count: int, device: torch.device) -> torch.Tensor:
        if not self._buffers or self._buffers[0].numel() < count:
            pin = device.type == "cuda"
            size = max(count, GRAPH_BATCH_SIZES[-1])
            self._buffers = [torch.zeros(size, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._turn ^= 1
        return self._buffers[self._turn][:count]
