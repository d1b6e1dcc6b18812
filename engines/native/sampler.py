"""Next-token choice per sequence: greedy, or temperature / top-k / top-p sampling.

Each sequence samples from its own `torch.Generator`, seeded from the request's seed, so a
seeded request gives the same tokens whatever else shares its batch. A row of logits holding a
NaN gets sequence.NAN_LOGITS, greedy or not.
"""

from __future__ import annotations

import random

import torch

from engines.base import SamplingParams
from engines.native.sequence import NAN_LOGITS


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab] -> int64 [rows]: each row's first maximum (torch.argmax's), NAN_LOGITS
    where the row holds a NaN (torch.argmax would answer the NaN's column)."""
    return torch.where(logits.isnan().any(dim=-1), NAN_LOGITS, logits.argmax(dim=-1))


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, seq_id: str) -> None:
        self._generators.pop(seq_id, None)

    def sample(self, logits: torch.Tensor, seq_ids: list[str], params: list[SamplingParams],
               greedy: torch.Tensor | None = None) -> list[int]:
        """logits: [seqs, vocab] float32 -> one token id per sequence. `greedy`: greedy_tokens(logits)
        when the caller already has it (a captured decode step computes it: kernels.argmax_rows)."""
        greedy = (greedy_tokens(logits) if greedy is None else greedy).tolist()
        tokens = []
        for row, (seq_id, sampling) in enumerate(zip(seq_ids, params)):
            if sampling.is_greedy or greedy[row] == NAN_LOGITS:  # NaN: torch.multinomial would raise
                tokens.append(greedy[row])
                continue
            probs = self._filtered_probabilities(logits[row], sampling)
            generator = self._generator(seq_id, sampling, probs.device)
            tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
        return tokens

    def _generator(self, seq_id: str, sampling: SamplingParams, device: torch.device) -> torch.Generator:
        if seq_id not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(sampling.seed if sampling.seed is not None else random.getrandbits(63))
            self._generators[seq_id] = generator
        return self._generators[seq_id]

    @staticmethod
    def _filtered_probabilities(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
        scaled = logits / sampling.temperature
        if 0 < sampling.top_k < scaled.shape[-1]:
            threshold = torch.topk(scaled, sampling.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
        probs = scaled.softmax(-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return probs / probs.sum()
