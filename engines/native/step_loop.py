"""Runs the scheduler's steps on the model runner, decode steps one ahead where it can.

Between two decode steps the host reads the tokens, appends them, checks for a stop and
fills the next step's inputs: on an H100 the GPU waited about 70 us a token for that at
batch 1 (2.7% of a Llama-3-8B INT4 step, 11% of a SmolLM2 one). When a decode batch is all
greedy, this loop launches step n + 1 before it reads step n's tokens: n + 1 takes them as
input on the device (ModelRunner.launch_decode), and the host's work for step n overlaps
step n + 1 on the GPU.

A step launched ahead is only a guess that every sequence goes on. It is not launched when
one of them reaches its length limit with step n, when requests wait for a prefill or when
the KV blocks for one more token are short. When a sequence stops on a token of step n (end
of sequence, a stop token, an abort), step n + 1's row for it is thrown away: its K/V went to
a position past the sequence's tokens, in a block the sequence held when the step was
launched. Any later owner of that block writes it in a later step, and a freed block is
shared through the prefix cache only for positions the sequence had computed.

A sequence whose step answers sequence.NAN_LOGITS (its logits held a NaN) is aborted and
reported with the finish reason NAN_FAILURE; the engine fails its request. The others in the
batch go on: their rows of every kernel are their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engines.native.scheduler import Scheduler
from engines.native.sequence import NAN_LOGITS, Sequence, SequenceStatus

if TYPE_CHECKING:  # torch: imported by whoever builds the runner, not by serving without this engine
    from engines.native.model_runner import ModelRunner, PendingTokens

StepResult = tuple[Sequence, int, str | None]  # sequence, its new token, finish reason (or None)
NAN_FAILURE = "nan_logits"  # the finish reason of a sequence whose logits held a NaN (its token: NAN_LOGITS)


class StepFailed(Exception):
    """A step raised: these sequences (the step's, and one launched ahead of it) are lost."""

    def __init__(self, seqs: list[Sequence], error: BaseException):
        super().__init__(str(error))
        self.seqs = seqs


class StepLoop:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, eos_token_ids: frozenset[int],
                 run_ahead: bool = True):
        self.scheduler = scheduler
        self.runner = runner
        self.eos_token_ids = eos_token_ids
        self.run_ahead = run_ahead
        self._in_flight: tuple[list[Sequence], PendingTokens] | None = None
        self.steps_ahead = 0  # decode steps launched before the previous one's tokens were read (a counter)

    @property
    def is_idle(self) -> bool:
        return self._in_flight is None and self.scheduler.is_idle

    def step(self, may_run_ahead: bool = True) -> list[StepResult]:
        """Runs one step, or finishes the one in flight, and returns its tokens (none for a
        sequence aborted meanwhile). `may_run_ahead`: False when the caller has news for
        the scheduler (a new request, say), so that no step is launched before it is heard."""
        if self._in_flight is None:
            seqs, is_prefill = self.scheduler.schedule()
            if not seqs:
                return []
            if is_prefill or not self._overlaps(seqs):
                try:
                    tokens = self.runner.run(seqs, is_prefill)
                except Exception as error:
                    raise StepFailed(seqs, error) from error
                return self._postprocess(seqs, tokens)
            try:
                self._in_flight = (seqs, self.runner.launch_decode(seqs))
            except Exception as error:
                raise StepFailed(seqs, error) from error
        seqs, pending = self._in_flight
        self._in_flight = None
        try:
            if may_run_ahead and self._may_launch_after(seqs):
                self._in_flight = (seqs, self.runner.launch_decode(seqs, after=pending))
                self.steps_ahead += 1
            tokens = pending.tokens()
        except Exception as error:
            self._in_flight = None
            raise StepFailed(seqs, error) from error
        return self._postprocess(seqs, tokens)

    def _overlaps(self, seqs: list[Sequence]) -> bool:
        return self.run_ahead and all(seq.sampling.is_greedy for seq in seqs)

    def _may_launch_after(self, seqs: list[Sequence]) -> bool:
        """Whether the step after the running one can be launched now: the same sequences all
        go on past it (as far as the host knows), nothing waits, and their blocks have room."""
        return (not self.scheduler.waiting
                and all(seq.status is SequenceStatus.RUNNING
                        and seq.num_generated_tokens + 1 < seq.sampling.max_tokens for seq in seqs)
                and self.scheduler.reserve_one_more(seqs))

    def _postprocess(self, seqs: list[Sequence], tokens: list[int]) -> list[StepResult]:
        live = [(seq, token) for seq, token in zip(seqs, tokens) if seq.status is SequenceStatus.RUNNING]
        broken = [seq for seq, token in live if token == NAN_LOGITS]
        for seq in broken:  # its blocks are freed; a step launched ahead for it is thrown away when read
            self.scheduler.abort(seq.seq_id)
        live = [(seq, token) for seq, token in live if token != NAN_LOGITS]
        reasons = self.scheduler.postprocess([seq for seq, _ in live], [token for _, token in live],
                                             self.eos_token_ids)
        return ([(seq, token, reason) for (seq, token), reason in zip(live, reasons)]
                + [(seq, NAN_LOGITS, NAN_FAILURE) for seq in broken])
