"""The Llama family (Llama 2/3, SmolLM2, Mistral-shaped models) over a paged KV cache.

Weights use Hugging Face's names, so a checkpoint's safetensors load directly. Attention
reads and writes a paged cache: `k_cache`/`v_cache` are [num_blocks, block_size, kv_heads,
head_dim] per layer; `AttentionMetadata` says where each token's K/V go (slot mapping) and
which blocks each sequence reads (block tables). The reference attention is plain torch and
runs anywhere; GPU kernels replace it where they are faster (part 2 of the native engine).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    tie_word_embeddings: bool = False
    head_dim: int | None = None

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> LlamaConfig:
        raw = json.loads((Path(directory) / "config.json").read_text())
        scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
        theta = raw.get("rope_theta") or (scaling or {}).get("rope_theta") or 10000.0
        if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = None
        fields = {name: raw[name] for name in cls.__dataclass_fields__ if name in raw and raw[name] is not None}
        fields.update(rope_theta=float(theta), rope_scaling=scaling)
        return cls(**fields)


# Shapes of the models we benchmark with random weights.
NAMED_SHAPES = {
    "llama-3-8b": LlamaConfig(128256, 4096, 14336, 32, 32, 8, 131072, 1e-5, 500000.0,
                              {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3.2-1b": LlamaConfig(128256, 2048, 8192, 16, 32, 8, 131072, 1e-5, 500000.0,
                                {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                tie_word_embeddings=True),
    "smollm2-135m": LlamaConfig(49152, 576, 1536, 30, 9, 3, 8192, 1e-5, 100000.0, None, tie_word_embeddings=True),
}


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    dim = config.dim_per_head
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        # Llama 3.1's long-context scaling: low frequencies slowed by `factor`, high ones kept,
        # a smooth blend between the two wavelength bounds.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelength > original / low, inv_freq / factor,
                               torch.where(wavelength < original / high, inv_freq, blended))
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim/2] (rotate-half convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the paged cache and what each sequence attends to."""

    is_prefill: bool
    slot_mapping: torch.Tensor  # [tokens] cache slot (block * block_size + offset) of each token
    context_lens: torch.Tensor  # [seqs] tokens each sequence attends to (including this step's)
    block_tables: torch.Tensor  # [seqs, max_blocks] block ids, padded with 0
    query_start: list[int]  # prefill: start of each sequence's tokens in the flat batch (+ end)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from engines.native.kernels import rms_norm  # Triton: GPUs only

            return rms_norm(x.contiguous(), self.weight, self.eps)
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def reference_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention over the paged cache, one sequence at a time, softmax in fp32.

    q: [tokens, heads, head_dim]; returns [tokens, heads, head_dim].
    """
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    outputs = []
    for index in range(meta.context_lens.shape[0]):
        length = int(meta.context_lens[index])
        blocks = meta.block_tables[index, :(length + block_size - 1) // block_size]
        keys = k_cache[blocks].reshape(-1, kv_heads, k_cache.shape[-1])[:length]  # [ctx, kv_heads, d]
        values = v_cache[blocks].reshape(-1, kv_heads, v_cache.shape[-1])[:length]
        if meta.is_prefill:
            queries = q[meta.query_start[index]:meta.query_start[index + 1]]  # [n, heads, d]
        else:
            queries = q[index:index + 1]
        keys = keys.repeat_interleave(group, dim=1).float()  # GQA: each KV head serves `group` heads
        values = values.repeat_interleave(group, dim=1).float()
        scores = torch.einsum("qhd,khd->hqk", queries.float(), keys) * scale  # [heads, n, ctx]
        num_queries = queries.shape[0]
        positions = torch.arange(length - num_queries, length, device=q.device)
        causal = torch.arange(length, device=q.device)[None, :] <= positions[:, None]  # [n, ctx]
        scores = scores.masked_fill(~causal[None], float("-inf"))
        outputs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype))
    return torch.cat(outputs, dim=0)


def batched_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Decode attention for the whole batch at once (no per-sequence loop), softmax in fp32.

    Gathers each sequence's blocks (padded to the longest block table), masks positions past
    its context length. q: [seqs, heads, head_dim] -> [seqs, heads, head_dim].
    """
    seqs, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    keys = k_cache[meta.block_tables].flatten(1, 2)  # [seqs, blocks * block_size, kv_heads, d]
    values = v_cache[meta.block_tables].flatten(1, 2)
    grouped = q.view(seqs, kv_heads, group, head_dim).float()
    scores = torch.einsum("skgd,stkd->skgt", grouped, keys.float()) * scale  # [seqs, kv, group, ctx]
    valid = torch.arange(keys.shape[1], device=q.device)[None, :] < meta.context_lens[:, None]  # [seqs, ctx]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("skgt,stkd->skgd", scores.softmax(-1), values.float())
    return out.reshape(seqs, heads, head_dim).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.dim_per_head
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata):
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        if x.is_cuda:
            from engines.native.kernels import apply_rope_inplace  # Triton: GPUs only

            q, k = apply_rope_inplace(q, cos, sin), apply_rope_inplace(k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        flat_k = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_v = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_k[meta.slot_mapping] = k  # write this step's K/V into their slots
        flat_v[meta.slot_mapping] = v
        scale = self.head_dim ** -0.5
        if meta.is_prefill:
            out = reference_attention(q, self.k_cache, self.v_cache, meta, scale)
        elif q.is_cuda:
            from engines.native.kernels import paged_decode_attention  # Triton: GPUs only

            out = paged_decode_attention(q.contiguous(), self.k_cache, self.v_cache, meta.block_tables,
                                         meta.context_lens, scale)
        else:
            out = batched_decode_attention(q, self.k_cache, self.v_cache, meta, scale)
        return self.o_proj(out.reshape(tokens, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                last_token_index: torch.Tensor) -> torch.Tensor:
        """input_ids/positions: [tokens]; returns logits [seqs, vocab] at `last_token_index`."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [tokens, head_dim/2]
        cos, sin = angles.cos(), angles.sin()
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, meta)
        x = self.model.norm(x[last_token_index])
        return self.lm_head(x).float()

    def load_checkpoint(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        state = {}
        for file in sorted(Path(directory).glob("*.safetensors")):
            state.update(load_file(str(file)))
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [name for name in missing if not (self.config.tie_word_embeddings and name == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
