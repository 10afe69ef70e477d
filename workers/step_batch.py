"""`StepBatch`: one step's work as plain data, the message from the scheduler to every rank.

The driver (which owns the scheduler and the block manager) flattens a `SchedulerOutput`
into token ids, positions, cache slots and block tables — decode rows first, then prefill
chunks — plus what the sampling rank needs per sampling row, and where a placeholder token
(async scheduling) is taken from the previous step's samples. It is picklable and holds no
tensors, so the same object drives an in-process runner or every rank of a worker group.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from splitserve.kvtransfer.messages import SendCommand
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.scheduler import ScheduledSeq, SchedulerOutput
from splitserve.workers.sequence import Sequence


@dataclass(frozen=True)
class ChunkPlan:
    """One prefill chunk: tokens [start, start + num_tokens) of the flattened batch."""

    start: int
    num_tokens: int
    #: Tokens of context after the chunk (cached prefix + chunk).
    context_len: int
    block_ids: list[int]


@dataclass(frozen=True)
class RankSampling:
    """The part of a request's `SamplingParams` the sampling rank reads. Stop strings,
    max_tokens and the rest stay with the driver, so a request's long stop list is never
    pickled to every rank at every step."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    #: Masked with EOS while fewer than ``min_tokens`` tokens exist.
    stop_token_ids: tuple[int, ...]
    min_tokens: int
    logprobs: int | None
    is_greedy: bool


@functools.lru_cache(maxsize=8192)
def rank_sampling(params: SamplingParams) -> RankSampling:
    """One per distinct params (a request keeps its params: built once, not every step)."""
    return RankSampling(params.temperature, params.top_p, params.top_k, params.min_p, params.seed,
                        params.stop_token_ids, params.min_tokens, params.logprobs, params.is_greedy)


@dataclass(frozen=True)
class SampleRow:
    """What the sampling rank needs for one row that yields a token this step."""

    request_id: str
    params: RankSampling
    #: Tokens generated before this step (min_tokens).
    num_output_tokens: int


@dataclass(frozen=True)
class StepBatch:
    input_ids: list[int]
    positions: list[int]
    #: Flat cache slot (block * block_size + offset) of each token.
    slot_mapping: list[int]
    #: The first ``num_decode`` tokens are single-token decode rows.
    num_decode: int
    #: Block ids of each decode row, padded with 0 to the longest (padding is masked).
    decode_block_tables: list[list[int]]
    #: Context length of each decode row, its new token included.
    decode_context_lens: list[int]
    prefills: list[ChunkPlan]
    #: Row in the flattened batch of each sampling sequence's last token.
    logits_indices: list[int]
    sample_rows: list[SampleRow]
    #: KV transfers to push while this step computes (prefill groups of disaggregated mode).
    kv_sends: list[SendCommand] = field(default_factory=list)
    #: The engine's number for this step (the runner keeps the tokens it samples).
    step_id: int = 0
    #: Rows whose token is a placeholder, and the sampling row of step ``step_id - 1`` whose
    #: token goes there (async scheduling: the runner fills them in on the device).
    fill_rows: list[int] = field(default_factory=list)
    fill_from: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def sampling_rows(out: SchedulerOutput) -> dict[Sequence, int]:
    """Each sampling sequence's row in the step's sampled tokens (where placeholders come from)."""
    return {item.seq: i for i, item in enumerate(s for s in out.scheduled if s.samples)}


def build_step_batch(out: SchedulerOutput, block_size: int, kv_sends: list[SendCommand] | None = None,
                     step_id: int = 0, previous: dict[Sequence, int] | None = None) -> StepBatch:
    """``previous``: `sampling_rows` of step ``step_id - 1``, where placeholder tokens come from."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_rows: list[int] = []
    chunks: list[ChunkPlan] = []
    fill_rows: list[int] = []
    fill_from: list[int] = []
    for item in out.scheduled:
        start, seq, first = len(ids), item.seq, item.start
        end = first + item.num_new_tokens
        ids += seq.token_slice(first, min(end, seq.num_tokens))
        if item.placeholder:
            if previous is None or seq not in previous:
                raise RuntimeError(f"{seq.request_id}: its placeholder token is not sampled by the previous step")
            fill_rows.append(len(ids))
            fill_from.append(previous[seq])
            ids.append(0)
        positions += range(first, end)
        slots += _slots(seq.block_ids, first, item.num_new_tokens, block_size)
        if item.samples:
            logits_rows.append(len(ids) - 1)
        if start >= len(out.decodes):
            chunks.append(ChunkPlan(start, item.num_new_tokens, end, list(seq.block_ids)))
    sampling = [s for s in out.scheduled if s.samples]
    return StepBatch(
        input_ids=ids, positions=positions, slot_mapping=slots, num_decode=len(out.decodes),
        decode_block_tables=_decode_tables(out.decodes, block_size),
        decode_context_lens=[s.start + 1 for s in out.decodes],
        prefills=chunks, logits_indices=logits_rows,
        sample_rows=[SampleRow(s.seq.request_id, rank_sampling(s.seq.params), s.num_prior_outputs) for s in sampling],
        kv_sends=kv_sends or [], step_id=step_id, fill_rows=fill_rows, fill_from=fill_from,
    )


def _slots(block_ids: list[int], first: int, count: int, block_size: int) -> list[int]:
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(first, first + count)]


def _decode_tables(decodes: list[ScheduledSeq], block_size: int) -> list[list[int]]:
    width = max((-(-(s.start + 1) // block_size) for s in decodes), default=0)
    return [s.seq.block_ids[:width] + [0] * (width - min(width, len(s.seq.block_ids))) for s in decodes]
