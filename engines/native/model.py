"""The Llama family (Llama 2/3, SmolLM2, Mistral-shaped models) over a paged KV cache.

Weights come in with Hugging Face's names (a checkpoint's safetensors, or random weights of a
named shape); `build_model` turns them into the model, fusing q/k/v into one projection and
gate/up into another (one matmul each instead of three and two), and keeping INT4 layers INT4.
Attention reads and writes a paged cache: `k_cache`/`v_cache` are [num_blocks, block_size,
kv_heads, head_dim] per layer; `AttentionMetadata` says where each token's K/V go (slot
mapping) and which blocks each sequence reads (block tables). Every path has a plain-torch
reference that runs anywhere; on CUDA, Triton kernels replace the small operations.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engines.native.linear import DenseLinear, Int4Linear, Linear, concatenated
from engines.native.quantization import Int4Weight


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
    query_start_tensor: torch.Tensor | None = None  # prefill: the same on the device (GPU prefill kernel)
    max_query_len: int = 1  # prefill: the most tokens one sequence computes in this step


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
    # Padding positions read other sequences' blocks (tables are padded with block 0): zeroed, so
    # that a NaN there (a sequence whose weights or input overflowed) does not reach this one as 0 x NaN.
    values = values.masked_fill(~valid[:, :, None, None], 0.0)
    out = torch.einsum("skgt,stkd->skgd", scores.softmax(-1), values.float())
    return out.reshape(seqs, heads, head_dim).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, qkv_proj: Linear, o_proj: Linear):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.dim_per_head
        self.qkv_proj = qkv_proj  # [q; k; v] rows: one matmul
        self.o_proj = o_proj
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, norm: RMSNorm, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """x: hidden states [tokens, hidden] -> x + attention output (of norm(x))."""
        tokens = x.shape[0]
        qkv = self.qkv_proj(x, norm=norm)  # [tokens, (heads + 2 * kv_heads) * head_dim]
        q_size = self.num_heads * self.head_dim
        scale = self.head_dim ** -0.5
        if x.is_cuda:
            out = self._attend_with_kernels(qkv, cos, sin, meta, scale)
        else:
            kv_size = self.num_kv_heads * self.head_dim
            q = apply_rope(qkv[:, :q_size].view(tokens, self.num_heads, self.head_dim), cos, sin)
            k = apply_rope(qkv[:, q_size:q_size + kv_size].view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
            v = qkv[:, q_size + kv_size:].view(tokens, self.num_kv_heads, self.head_dim)
            self.k_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = k  # into their slots
            self.v_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = v
            if meta.is_prefill:
                out = reference_attention(q, self.k_cache, self.v_cache, meta, scale)
            else:
                out = batched_decode_attention(q, self.k_cache, self.v_cache, meta, scale)
        return self.o_proj(out.reshape(tokens, q_size), residual=x)

    def _attend_with_kernels(self, qkv, cos, sin, meta, scale) -> torch.Tensor:
        from engines.native.attention_kernels import paged_prefill_attention, rope_cache_and_decode_attention
        from engines.native.kernels import rope_and_cache_write

        if not meta.is_prefill:  # one kernel: rope, the cache write and attention
            return rope_cache_and_decode_attention(qkv, cos, sin, meta.slot_mapping, self.k_cache, self.v_cache,
                                                   meta.block_tables, meta.context_lens, self.num_heads, scale)
        rope_and_cache_write(qkv, cos, sin, meta.slot_mapping, self.k_cache, self.v_cache, self.num_heads)
        q = qkv[:, :self.num_heads * self.head_dim].view(qkv.shape[0], self.num_heads, self.head_dim)
        return paged_prefill_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens,
                                       meta.query_start_tensor, meta.max_query_len, scale)


class MLP(nn.Module):
    def __init__(self, gate_up_proj: Linear, down_proj: Linear):
        super().__init__()
        self.gate_up_proj = gate_up_proj  # [gate; up] rows: one matmul, silu(gate) * up fused after it
        self.down_proj = down_proj

    def forward(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """x + MLP(norm(x))."""
        return self.down_proj(self.gate_up_proj.gated(x, norm=norm), residual=x)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, self_attn: Attention, mlp: MLP):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x, cos, sin, meta):
        # The norms run inside the next matmul where it can (the INT4 kernels, where a program
        # sees whole rows), the residual adds inside o_proj and down_proj.
        x = self.self_attn(x, self.input_layernorm, cos, sin, meta)
        return self.mlp(x, self.post_attention_layernorm)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig, layers: list[DecoderLayer], embed_tokens: nn.Embedding,
                 norm: RMSNorm, lm_head: Linear):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        self.register_buffer("inv_freq", rope_inverse_frequencies(config).to(embed_tokens.weight.device),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                last_token_index: torch.Tensor | None = None,
                fed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """input_ids/positions: [tokens]; returns float32 logits [len(last_token_index), vocab]
        (every token's when None). `fed` = (flags, ids): rows whose flag is set take their input
        id from `ids` instead (a captured decode step, the previous step's tokens on the device)."""
        if input_ids.is_cuda:
            from engines.native.kernels import embed_and_rotary_tables  # Triton: GPUs only

            x, cos, sin = embed_and_rotary_tables(self.embed_tokens.weight, input_ids, positions, self.inv_freq, fed)
        else:
            if fed is not None:
                input_ids = torch.where(fed[0].bool(), fed[1], input_ids)
            angles = positions.float()[:, None] * self.inv_freq[None, :]  # [tokens, head_dim/2]
            cos, sin = angles.cos(), angles.sin()
            x = self.embed_tokens(input_ids.clamp_min(0))  # a fed-back NAN_LOGITS (-1) reads row 0, as on the GPU
        for layer in self.layers:
            x = layer(x, cos, sin, meta)
        x = self.norm(x if last_token_index is None else x[last_token_index])
        return self.lm_head(x).float()

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights a decode step reads for one token (the embedding table: one row)."""
        linears = [module for module in self.modules() if isinstance(module, (DenseLinear, Int4Linear))]
        norms = [module.weight for module in self.modules() if isinstance(module, RMSNorm)]
        row = self.embed_tokens.weight[0]
        return (sum(layer.weight_bytes() for layer in linears) + sum(n.numel() * n.element_size() for n in norms)
                + row.numel() * row.element_size())


# --- building the model from a state dict with Hugging Face's names ---------------------------

def read_checkpoint(directory: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(str(file)))
    if not state:
        raise ValueError(f"no *.safetensors weights in {directory}")
    return state


def random_state(config: LlamaConfig, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of a named shape (normal, std 0.02) with Hugging Face's names, for benchmarks."""
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden, inner, d = config.hidden_size, config.intermediate_size, config.dim_per_head

    def normal(*shape):
        return (torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * 0.02).to(dtype)

    state = {"model.embed_tokens.weight": normal(config.vocab_size, hidden),
             "model.norm.weight": torch.ones(hidden, device=device, dtype=dtype)}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = normal(config.vocab_size, hidden)
    shapes = {"self_attn.q_proj": (config.num_attention_heads * d, hidden),
              "self_attn.k_proj": (config.num_key_value_heads * d, hidden),
              "self_attn.v_proj": (config.num_key_value_heads * d, hidden),
              "self_attn.o_proj": (hidden, config.num_attention_heads * d),
              "mlp.gate_proj": (inner, hidden), "mlp.up_proj": (inner, hidden), "mlp.down_proj": (hidden, inner)}
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}."
        for name, shape in shapes.items():
            state[f"{prefix}{name}.weight"] = normal(*shape)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{prefix}{norm}.weight"] = torch.ones(hidden, device=device, dtype=dtype)
    return state


def build_model(config: LlamaConfig, state: dict[str, torch.Tensor], device: str | torch.device,
                dtype: torch.dtype, quantize: str | None = None, quantize_lm_head: bool = False) -> LlamaForCausalLM:
    """The model from a state dict with Hugging Face's names (INT4 layers stored as `.qweight`,
    `.scales`, `.zeros`). `quantize="int4"` quantizes dense layers (RTN) as they load; the LM head
    stays in `dtype` unless `quantize_lm_head` (a tied head gets its own INT4 copy: the embedding
    lookup keeps the dense table). Takes tensors out of `state` as it goes, so weights are not held twice.
    """
    if quantize not in (None, "int4"):
        raise ValueError(f"unknown quantization '{quantize}' (expected 'int4')")
    used: set[str] = set()

    def tensor(name: str, floating: bool = True) -> torch.Tensor:
        if name not in state:
            raise ValueError(f"checkpoint does not match the model: missing {name}")
        used.add(name)
        value = state[name].to(device)
        return value.to(dtype) if floating and value.is_floating_point() else value

    def linear(prefix: str) -> Linear:
        if f"{prefix}.qweight" in state:
            return Int4Linear(Int4Weight(tensor(f"{prefix}.qweight"), tensor(f"{prefix}.scales", floating=False),
                                         tensor(f"{prefix}.zeros")))
        layer = DenseLinear(tensor(f"{prefix}.weight"))
        return layer.quantized() if quantize == "int4" else layer

    layers = []
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}."
        qkv = concatenated([linear(f"{prefix}self_attn.{name}_proj") for name in "qkv"])
        attention = Attention(config, qkv, linear(f"{prefix}self_attn.o_proj"))
        mlp = MLP(concatenated([linear(f"{prefix}mlp.gate_proj"), linear(f"{prefix}mlp.up_proj")]),
                  linear(f"{prefix}mlp.down_proj"))
        layer = DecoderLayer(config, attention, mlp).to(device)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            getattr(layer, norm).weight.data = tensor(f"{prefix}{norm}.weight")
        layers.append(layer)
        for name in [key for key in state if key.startswith(prefix)]:
            del state[name]  # this layer's source tensors are no longer needed
    embed = nn.Embedding.from_pretrained(tensor("model.embed_tokens.weight"), freeze=True)
    norm = RMSNorm(config.hidden_size, config.rms_norm_eps).to(device)
    norm.weight.data = tensor("model.norm.weight")
    if config.tie_word_embeddings:
        lm_head = DenseLinear(embed.weight.data)
    else:
        lm_head = DenseLinear(tensor("lm_head.weight"))
    if quantize_lm_head:
        lm_head = lm_head.quantized()
    unexpected = [name for name in state if name not in used and not name.startswith("model.layers.")
                  and "rotary_emb" not in name]
    if unexpected:
        raise ValueError(f"checkpoint does not match the model: unexpected {unexpected[:5]}")
    return LlamaForCausalLM(config, layers, embed, norm, lm_head).eval()
