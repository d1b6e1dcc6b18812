"""Owns every tensor of the native engine: weights, the paged KV cache, step inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engines.native.model import NAMED_SHAPES, AttentionMetadata, LlamaConfig, LlamaForCausalLM
from engines.native.sampler import Sampler
from engines.native.sequence import Sequence


@dataclass(frozen=True)
class RunnerConfig:
    device: str = "cpu"
    dtype: str = "float32"  # "bfloat16" on GPUs
    block_size: int = 16
    kv_cache_tokens: int = 32768  # KV-cache capacity, in tokens
    cuda_graphs: bool = True  # on CUDA: replay captured decode steps instead of launching each kernel
    max_context_tokens: int = 8192  # longest sequence a captured decode step serves


GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)


class ModelRunner:
    def __init__(self, config: RunnerConfig, checkpoint: str | Path | None = None, shape: str | None = None):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        model_config = LlamaConfig.from_checkpoint(checkpoint) if checkpoint else NAMED_SHAPES[shape]
        self.model_config = model_config
        with torch.device(self.device):
            model = LlamaForCausalLM(model_config)
        if checkpoint:
            model.load_checkpoint(checkpoint)
        else:  # random weights of a named shape, for benchmarks
            for parameter in model.parameters():
                torch.nn.init.normal_(parameter, std=0.02)
        self.model = model.to(self.dtype).eval()
        self.num_blocks = max(1, config.kv_cache_tokens // config.block_size)
        # One more block than the block manager hands out: padding rows of a captured decode
        # step write their K/V there, never into a real sequence's blocks.
        self.scratch_block = self.num_blocks
        self._allocate_kv_cache()
        self.sampler = Sampler()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict]] = {}
        self._graph_pool = None
        self.use_graphs = config.cuda_graphs and self.device.type == "cuda"

    def _allocate_kv_cache(self) -> None:
        c = self.model_config
        shape = (self.num_blocks + 1, self.config.block_size, c.num_key_value_heads, c.dim_per_head)
        for layer in self.model.model.layers:
            layer.self_attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.self_attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        """One step: prefill (all uncomputed tokens) or decode (the last token) -> next tokens."""
        if not is_prefill and self.use_graphs and len(seqs) <= GRAPH_BATCH_SIZES[-1] \
                and max(seq.num_tokens for seq in seqs) <= self.config.max_context_tokens:
            logits = self._decode_with_graph(seqs)
        else:
            logits = self.logits(seqs, is_prefill)
        return self.sampler.sample(logits, [seq.seq_id for seq in seqs], [seq.sampling for seq in seqs])

    # --- CUDA graphs for decode ---------------------------------------------------------------

    def _decode_with_graph(self, seqs: list[Sequence]) -> torch.Tensor:
        count = len(seqs)
        bucket = next(size for size in GRAPH_BATCH_SIZES if size >= count)
        graph, static = self._graphs.get(bucket) or self._capture(bucket)
        block_size = self.config.block_size
        ids, positions, slots, lengths = [], [], [], []
        table = torch.full((bucket, static["block_tables"].shape[1]), self.scratch_block, dtype=torch.long)
        for row, seq in enumerate(seqs):
            position = seq.num_tokens - 1
            ids.append(seq.token_ids[position])
            positions.append(position)
            slots.append(seq.block_table[position // block_size] * block_size + position % block_size)
            lengths.append(seq.num_tokens)
            table[row, :len(seq.block_table)] = torch.tensor(seq.block_table)
        padding = bucket - count  # rows past the batch attend to one token of the scratch block
        host = {
            "input_ids": torch.tensor(ids + [0] * padding),
            "positions": torch.tensor(positions + [0] * padding),
            "slot_mapping": torch.tensor(slots + [self.scratch_block * block_size] * padding),
            "context_lens": torch.tensor(lengths + [1] * padding),
            "block_tables": table,
        }
        for name, tensor in host.items():
            static[name].copy_(tensor, non_blocking=True)
        graph.replay()
        return static["logits"][:count]

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, dict]:
        width = (self.config.max_context_tokens + self.config.block_size - 1) // self.config.block_size
        as_long = dict(dtype=torch.long, device=self.device)
        static = {
            "input_ids": torch.zeros(bucket, **as_long),
            "positions": torch.zeros(bucket, **as_long),
            "slot_mapping": torch.full((bucket,), self.scratch_block * self.config.block_size, **as_long),
            "context_lens": torch.ones(bucket, **as_long),
            "block_tables": torch.full((bucket, width), self.scratch_block, **as_long),
            "last_index": torch.arange(bucket, **as_long),
        }
        meta = AttentionMetadata(False, static["slot_mapping"], static["context_lens"], static["block_tables"], [])

        def forward() -> torch.Tensor:
            return self.model(static["input_ids"], static["positions"], meta, static["last_index"])

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            forward()  # warm-up: compiles the Triton kernel, settles the allocator
        torch.cuda.current_stream().wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool), torch.inference_mode():
            static["logits"] = forward()
        self._graphs[bucket] = (graph, static)
        return graph, static

    @torch.inference_mode()
    def logits(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """The step's forward pass: float32 logits [seqs, vocab] at each sequence's last token."""
        input_ids, positions, slots, query_start, last_index = [], [], [], [0], []
        block_size = self.config.block_size
        for seq in seqs:
            start = seq.num_computed_tokens if is_prefill else seq.num_tokens - 1
            for position in range(start, seq.num_tokens):
                input_ids.append(seq.token_ids[position])
                positions.append(position)
                slots.append(seq.block_table[position // block_size] * block_size + position % block_size)
            query_start.append(len(input_ids))
            last_index.append(len(input_ids) - 1)
        width = max(len(seq.block_table) for seq in seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs]
        as_long = dict(dtype=torch.long, device=self.device)
        meta = AttentionMetadata(
            is_prefill=is_prefill,
            slot_mapping=torch.tensor(slots, **as_long),
            context_lens=torch.tensor([seq.num_tokens for seq in seqs], **as_long),
            block_tables=torch.tensor(tables, **as_long),
            query_start=query_start,
        )
        return self.model(torch.tensor(input_ids, **as_long), torch.tensor(positions, **as_long), meta,
                          torch.tensor(last_index, **as_long))
