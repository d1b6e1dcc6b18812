"""lowbit's INT4 weight-only format and the two ways into it: RTN and activation-aware (AWQ) scales.

Format, per linear layer with weight W [N out, K in] (nn.Linear's layout):
- `qweight` int32 [N, K // 8]: eight 4-bit values per word, value j in bits 4j..4j+3. Words
  come in blocks of 8 covering 64 inputs, interleaved: word w of a block holds inputs
  8j + w (j = 0..7) of that block. So the j-th values of consecutive words are consecutive
  inputs, and a kernel that unpacks value j of many words at once reads x contiguously.
- `scales` float16 [N, K // G] and `zeros` uint8 [N, K // G]: one scale and one integer zero
  point (0..15) per group of G consecutive inputs; W[n, k] ~ (q - zero) * scale.
G is 128, or 64 where K is not a multiple of 128 (SmolLM2's 576); K must be a multiple of 64. The group size is not stored: it is K // scales.shape[1].
In memory (not in files), `scales` and `zeros` may be stored group by group (`group_major`: a
transposed copy seen as [N, K // G]); the kernels take both strides. Loaded models keep them so:
a decode step's program then reads one group's scales for many rows from one piece of memory
rather than one per row (session 6: one Llama-3-8B layer at 1 row 74 -> 68 us).
Likewise the words (`tile`, where G is 128 and N a multiple of UNIT_ROWS): `qweight` int32
[N // UNIT_ROWS, K // G, UNIT_ROWS, 16], each group's words for UNIT_ROWS rows in one 8 KB block,
the piece a decode kernel reads at a time. Row by row, that piece is 128 runs of 64 bytes 2 KB or
more apart; an H100 reads such runs a quarter slower than whole blocks (session 20: 2.09 against
2.62 TB/s with the skinny kernel's programs and depth), and a Llama-3-8B INT4 batch-1 step took
2,389 us against 2,264 tiled (decode 412.5 -> 438.8 tok/s; batch 64 6,156 -> 5,723 us, wgmma).

Like gpt-fast, quantizing is one phase (here or in `lowbit prepare`) and running is another
(`Int4Linear` loads the packed tensors). Plain torch; no GPU needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_GROUP_SIZE = 128
PACK = 8  # 4-bit values per int32 word


BLOCK = 64  # inputs per interleaved block of 8 words
UNIT_ROWS = 128  # weight rows of a tiled block (`Int4Weight.tile`)
UNIT_WORDS = 16  # words of a group of 128 inputs: a tiled block's width


def group_size_for(in_features: int, preferred: int = DEFAULT_GROUP_SIZE) -> int:
    for size in (preferred, BLOCK):
        if in_features % size == 0:
            return size
    raise ValueError(f"INT4 needs a multiple of {BLOCK} inputs, not {in_features}")


@dataclass
class Int4Weight:
    qweight: torch.Tensor  # int32 [N, K // 8], or tiled [N // UNIT_ROWS, K // 128, UNIT_ROWS, UNIT_WORDS]
    scales: torch.Tensor  # float16 [N, K // G]
    zeros: torch.Tensor  # uint8 [N, K // G]

    @property
    def tiled(self) -> bool:
        return self.qweight.dim() == 4

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales.shape[0], self.words_per_row * PACK

    @property
    def words_per_row(self) -> int:
        return self.qweight.shape[1] * UNIT_WORDS if self.tiled else self.qweight.shape[1]

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scales.shape[1]

    def can_tile(self) -> bool:
        n, k = self.shape
        return n % UNIT_ROWS == 0 and self.group_size == UNIT_WORDS * PACK

    def tile(self) -> Int4Weight:
        """The same weight with its words stored tile by tile (module docstring); as it is where
        that layout does not apply (`can_tile`) or already holds."""
        if self.tiled or not self.can_tile():
            return self
        n, words = self.qweight.shape
        blocks = self.qweight.view(n // UNIT_ROWS, UNIT_ROWS, words // UNIT_WORDS, UNIT_WORDS)
        return Int4Weight(blocks.transpose(1, 2).contiguous(), self.scales, self.zeros)

    def row_major(self) -> Int4Weight:
        """The same weight with its words row by row (the format's own layout)."""
        if not self.tiled:
            return self
        tiles, groups, rows, words = self.qweight.shape
        qweight = self.qweight.transpose(1, 2).reshape(tiles * rows, groups * words)
        return Int4Weight(qweight, self.scales, self.zeros)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] weights in `dtype`, computed in float32."""
        q = unpack_int4(self.row_major().qweight).float()  # [N, K]
        n, k = q.shape
        grouped = q.view(n, k // self.group_size, self.group_size)
        weights = (grouped - self.zeros.float()[..., None]) * self.scales.float()[..., None]
        return weights.view(n, k).to(dtype)

    def group_major(self) -> Int4Weight:
        """The same weight with `scales` and `zeros` stored group by group (same shapes and values)."""
        return Int4Weight(self.qweight, self.scales.t().contiguous().t(), self.zeros.t().contiguous().t())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """uint8/int values in 0..15, [N, K] -> int32 [N, K // 8] in the interleaved layout above."""
    n, k = values.shape
    if k % BLOCK:
        raise ValueError(f"K={k} is not a multiple of {BLOCK}")
    # [N, blocks, j, w] -> [N, blocks, w, j]: word w of a block gathers inputs 8j + w.
    nibbles = values.to(torch.int64).view(n, k // BLOCK, PACK, PACK).transpose(2, 3)
    shifts = torch.arange(PACK, dtype=torch.int64, device=values.device) * 4
    words = (nibbles << shifts).sum(-1).reshape(n, k // PACK)  # 0 .. 2^32 - 1
    words = torch.where(words >= 2**31, words - 2**32, words)  # as two's-complement int32
    return words.to(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, K // 8] -> uint8 [N, K]; the exact inverse of `pack_int4`."""
    n, num_words = qweight.shape
    shifts = torch.arange(PACK, dtype=torch.int32, device=qweight.device) * 4
    nibbles = (qweight[..., None] >> shifts) & 0xF  # [N, words, j]; the mask drops the sign
    nibbles = nibbles.view(n, num_words // PACK, PACK, PACK).transpose(2, 3)  # [N, blocks, j, w]
    return nibbles.reshape(n, num_words * PACK).to(torch.uint8)


def quantize_rtn(weight: torch.Tensor, group_size: int | None = None) -> Int4Weight:
    """Round to nearest, asymmetric, per group: the range [min, max] of each group maps to 0..15."""
    n, k = weight.shape
    group = group_size or group_size_for(k)
    grouped = weight.float().view(n, k // group, group)
    low = grouped.amin(-1).clamp(max=0.0)  # keep 0 representable exactly
    high = grouped.amax(-1).clamp(min=0.0)
    scales = ((high - low) / 15).clamp(min=1e-8).to(torch.float16)  # rounded first: q uses the stored scale
    zeros = (-low / scales.float()).round().clamp(0, 15)
    q = (grouped / scales.float()[..., None] + zeros[..., None]).round().clamp(0, 15)
    return Int4Weight(pack_int4(q.view(n, k).to(torch.uint8)), scales, zeros.to(torch.uint8))


# --- activation-aware scaling (AWQ) ------------------------------------------------------------

AWQ_GRID = 20  # exponents tried: 0, 1/20, ..., 19/20


def awq_input_scales(weights: list[torch.Tensor], inputs: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Per-input-channel scales s [K] that make INT4 RTN of W * s lose the least on real inputs.

    `weights` share one input (q/k/v, or gate/up); `inputs` [tokens, K] are that input on
    calibration text. Channels with large activations matter most, so they are scaled up
    before rounding (and the inverse scale is folded into whatever produces the input):
    s = mean|x|^alpha, alpha chosen on a grid by the error of the layers' outputs.
    """
    inputs = inputs.float()
    magnitude = inputs.abs().mean(0).clamp(min=1e-5)  # [K]
    stacked = torch.cat([w.float() for w in weights], dim=0)  # [sum N, K]
    reference = inputs @ stacked.T
    best_error, best_scales = float("inf"), torch.ones_like(magnitude)
    for step in range(AWQ_GRID):
        alpha = step / AWQ_GRID
        scales = magnitude.pow(alpha)
        scales = scales / (scales.max() * scales.min()).sqrt()  # centred around 1
        quantized = quantize_rtn(stacked * scales, group_size).dequantize() / scales
        error = (inputs @ quantized.T - reference).pow(2).mean().item()
        if error < best_error:
            best_error, best_scales = error, scales
    return best_scales
