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
        self._allocate_kv_cache()
        self.sampler = Sampler()

    def _allocate_kv_cache(self) -> None:
        c = self.model_config
        shape = (self.num_blocks, self.config.block_size, c.num_key_value_heads, c.dim_per_head)
        for layer in self.model.model.layers:
            layer.self_attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.self_attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        """One step: prefill (all uncomputed tokens) or decode (the last token) -> next tokens."""
        logits = self.logits(seqs, is_prefill)
        return self.sampler.sample(logits, [seq.seq_id for seq in seqs], [seq.sampling for seq in seqs])

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
