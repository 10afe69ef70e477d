"""`StepBatch`: one step's work as plain data, the message from the scheduler to every rank.

The driver (which owns the scheduler and the block manager) flattens a `SchedulerOutput`
into token ids, positions, cache slots and block tables — decode rows first, then prefill
chunks — plus what the sampling rank needs per sampling row. It is picklable and holds no
tensors, so the same object drives an in-process runner or every rank of a worker group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.kvtransfer.messages import SendCommand
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.scheduler import ScheduledSeq, SchedulerOutput


@dataclass(frozen=True)
class ChunkPlan:
    """One prefill chunk: tokens [start, start + num_tokens) of the flattened batch."""

    start: int
    num_tokens: int
    #: Tokens of context after the chunk (cached prefix + chunk).
    context_len: int
    block_ids: list[int]


@dataclass(frozen=True)
class SampleRow:
    """What the sampling rank needs for one row that yields a token this step."""

    request_id: str
    params: SamplingParams
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

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def build_step_batch(out: SchedulerOutput, block_size: int, kv_sends: list[SendCommand] | None = None) -> StepBatch:
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_rows: list[int] = []
    chunks: list[ChunkPlan] = []
    for item in out.scheduled:
        start, seq, first = len(ids), item.seq, item.seq.num_computed_tokens
        ids += seq.token_slice(first, first + item.num_new_tokens)
        positions += range(first, first + item.num_new_tokens)
        slots += _slots(seq.block_ids, first, item.num_new_tokens, block_size)
        if item.samples:
            logits_rows.append(len(ids) - 1)
        if start >= len(out.decodes):
            chunks.append(ChunkPlan(start, item.num_new_tokens, first + item.num_new_tokens, list(seq.block_ids)))
    sampling = [s for s in out.scheduled if s.samples]
    return StepBatch(
        input_ids=ids, positions=positions, slot_mapping=slots, num_decode=len(out.decodes),
        decode_block_tables=_decode_tables(out.decodes, block_size),
        decode_context_lens=[s.seq.num_computed_tokens + 1 for s in out.decodes],
        prefills=chunks, logits_indices=logits_rows,
        sample_rows=[SampleRow(s.seq.request_id, s.seq.params, s.seq.num_output_tokens) for s in sampling],
        kv_sends=kv_sends or [],
    )


def _slots(block_ids: list[int], first: int, count: int, block_size: int) -> list[int]:
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(first, first + count)]


def _decode_tables(decodes: list[ScheduledSeq], block_size: int) -> list[list[int]]:
    width = max((-(-(s.seq.num_computed_tokens + 1) // block_size) for s in decodes), default=0)
    return [s.seq.block_ids[:width] + [0] * (width - min(width, len(s.seq.block_ids))) for s in decodes]
