"""A request's state inside one engine: tokens, progress, KV blocks, status.

Lifecycle: WAITING (queued, or preempted and waiting to recompute) -> RUNNING (has KV
blocks; computes prompt chunks then one token per step) -> FINISHED_* (blocks freed).
A preempted sequence goes back to WAITING with ``num_computed_tokens = 0`` and keeps its
output tokens: recomputing prompt + output rebuilds the same KV, so output stays exact.
One owner writes all of this progress (tokens, counters, block table, status): the
scheduler (scheduler.py); the block manager only says which blocks it hands out.

Tokens move through three counters: *computed* (their K/V are in the cache), *in flight*
(in a submitted micro-batch that has not come back) and *placeholders* (output tokens a
submitted batch samples, not known here yet: with async scheduling the next step is scheduled
before the previous one's tokens arrive, and the runner fills them in on the device).

``cache_salt`` (optional, vLLM's name) partitions the prefix cache: it keys the hash of the
sequence's first block, so its blocks are shared only with sequences of the very same salt
(see `cache_salt`). It is no sampling parameter: it changes no token, only which cached
blocks a request may reuse, and so what ``num_cached_tokens`` can reveal to its caller.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from splitserve.workers.sampler import TokenLogprobs
from splitserve.workers.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    #: Tokens whose K/V are in the cache (prefix hits included).
    num_computed_tokens: int = 0
    #: Prompt tokens served from the prefix cache on the first admission.
    num_cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    #: Hash chain of this sequence's full, computed blocks (prefix caching).
    block_hashes: list[bytes] = field(default_factory=list)
    #: Leading blocks of ``block_ids`` already offered to the prefix cache.
    num_registered_blocks: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    num_preemptions: int = 0
    #: Tokens of submitted micro-batches that have not come back from the workers yet.
    num_inflight_tokens: int = 0
    #: Output tokens sampled by submitted micro-batches and not appended yet.
    num_placeholders: int = 0
    #: Prefix-cache partition (None: the shared, unsalted one); see the module docstring.
    cache_salt: str | None = None

    @property
    def in_flight(self) -> bool:
        """Part of a micro-batch that has not come back from the workers yet."""
        return self.num_inflight_tokens > 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens computed or being computed: where the next scheduled token starts."""
        return self.num_computed_tokens + self.num_inflight_tokens

    @property
    def num_unscheduled_tokens(self) -> int:
        """Tokens (placeholders included) that no submitted micro-batch computes yet."""
        return self.num_tokens + self.num_placeholders - self.num_scheduled_tokens

    @property
    def num_generated(self) -> int:
        """Output tokens once every submitted batch is back (placeholders included)."""
        return self.num_output_tokens + self.num_placeholders

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.is_finished else None

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without building the whole list."""
        n = self.num_prompt_tokens
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]
