"""One request's state inside the native engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engines.base import SamplingParams

# The token a step answers for a sequence whose logits hold a NaN (broken weights or an overflow):
# no token can be chosen from them, so the step loop fails that sequence's request instead of
# streaming whatever argmax happens to pick. Fed back into a step launched ahead, it reads as
# token 0 (the model's embedding clamps ids at 0), and that step's row is thrown away.
NAN_LOGITS = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: str
    token_ids: list[int]  # prompt, then generated tokens
    sampling: SamplingParams
    num_prompt_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)  # KV block ids, in token order
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache

    def __post_init__(self) -> None:
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def num_blocks_needed(self, block_size: int) -> int:
        return (self.num_tokens + block_size - 1) // block_size
