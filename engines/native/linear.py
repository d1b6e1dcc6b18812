"""The native engine's linear layers: bf16/fp32 dense weights, or lowbit's INT4 format.

Both take the same calls, so the model does not care which it holds:
- `layer(x)` -> x @ W.T, and `layer(x, residual=r)` -> r + x @ W.T (the residual add fused
  into the matmul: cuBLAS' addmm for dense weights, the INT4 kernel's epilogue otherwise);
- `layer.gated(x)` for a fused gate/up projection (W = [gate; up]) -> silu(x @ G.T) * (x @ U.T);
- `norm=` (an RMSNorm module) on either: multiply norm(x) instead of x. The INT4 kernels
  do the norm themselves where their programs see whole rows; elsewhere it runs first.
On the CPU every path is plain torch (INT4 dequantizes, then multiplies): the reference that
the Triton kernels are tested against.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engines.native.quantization import Int4Weight, quantize_rtn


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[tokens, 2 * I] (gate then up) -> [tokens, I]."""
    if gate_up.is_cuda:
        from engines.native.kernels import silu_and_mul as fused  # Triton: GPUs only

        return fused(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class DenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [N, K]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, norm: nn.Module | None = None) -> torch.Tensor:
        if norm is not None:
            x = norm(x)
        if residual is None:
            return F.linear(x, self.weight)
        return torch.addmm(residual, x, self.weight.T)

    def gated(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        return silu_and_mul(F.linear(x if norm is None else norm(x), self.weight))

    def quantized(self) -> Int4Linear:
        return Int4Linear(quantize_rtn(self.weight.data))

    def weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class Int4Linear(nn.Module):
    def __init__(self, weight: Int4Weight):
        super().__init__()
        weight = weight.group_major().tile()  # what the decode kernels read fastest (quantization.py)
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)
        self._dequantized: torch.Tensor | None = None  # CPU reference path only

    @property
    def int4(self) -> Int4Weight:
        return Int4Weight(self.qweight, self.scales, self.zeros)

    def _reference_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self._dequantized is None or self._dequantized.dtype != dtype:
            self._dequantized = self.int4.dequantize(dtype)
        return self._dequantized

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, norm: nn.Module | None = None) -> torch.Tensor:
        if x.is_cuda:
            from engines.native.int4_kernels import int4_matmul  # Triton: GPUs only

            return int4_matmul(x, self.int4, residual=residual, norm=_norm_arguments(norm))
        if norm is not None:
            x = norm(x)
        out = F.linear(x, self._reference_weight(x.dtype))
        return out if residual is None else out + residual

    def gated(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        if x.is_cuda:
            from engines.native.int4_kernels import int4_matmul

            return int4_matmul(x, self.int4, gated=True, norm=_norm_arguments(norm))
        if norm is not None:
            x = norm(x)
        return silu_and_mul(F.linear(x, self._reference_weight(x.dtype)))

    def weight_bytes(self) -> int:
        return self.int4.nbytes()


Linear = DenseLinear | Int4Linear


def _norm_arguments(norm: nn.Module | None) -> tuple[torch.Tensor, float] | None:
    return None if norm is None else (norm.weight, norm.eps)


def concatenated(layers: list[Linear]) -> Linear:
    """One layer computing several that share an input (q/k/v, gate/up): outputs side by side."""
    if all(isinstance(layer, DenseLinear) for layer in layers):
        return DenseLinear(torch.cat([layer.weight.data for layer in layers]))
    if all(isinstance(layer, Int4Linear) for layer in layers):
        parts = [layer.int4.row_major() for layer in layers]
        return Int4Linear(Int4Weight(*(torch.cat([getattr(p, name) for p in parts])
                                       for name in ("qweight", "scales", "zeros"))))
    raise ValueError("cannot concatenate dense and INT4 layers")
