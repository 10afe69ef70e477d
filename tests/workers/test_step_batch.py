"""workers/step_batch.py: a step's work as plain data for the ranks. Decode rows come first,
every sampling row carries only what the sampling rank reads. The hand-built steps below
check every list of the batch (ids, positions, slots, block tables, chunks, sampling and
placeholder rows) against a layout computed by hand."""

from __future__ import annotations

import pickle

import pytest

from splitserve.kvtransfer.messages import SendCommand
from splitserve.workers.block_manager import BlockManager
from splitserve.workers.config import SchedulerConfig
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from splitserve.workers.sequence import Sequence
from splitserve.workers.step_batch import (
    ChunkPlan, RankSampling, SampleRow, build_step_batch, rank_sampling, sampling_rows,
)

BS = 4


def _scheduled(params: SamplingParams, prompt_len: int = 6):
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), BlockManager(32, BS))
    scheduler.add(Sequence("r", list(range(3, 3 + prompt_len)), params))
    return scheduler.schedule()


def test_a_prompt_chunk_becomes_rows_slots_and_one_sampling_row():
    out = _scheduled(SamplingParams(max_tokens=3, temperature=0.0))
    batch = build_step_batch(out, BS, [], step_id=1)
    assert batch.input_ids == list(range(3, 9)) and batch.positions == list(range(6))
    assert batch.num_decode == 0 and len(batch.prefills) == 1 and batch.logits_indices == [5]
    seq = out.scheduled[0].seq
    assert batch.slot_mapping == [seq.block_ids[p // BS] * BS + p % BS for p in range(6)]
    [row] = batch.sample_rows
    assert row.request_id == "r" and row.num_output_tokens == 0 and row.params.is_greedy


def test_ranks_never_receive_stop_strings():
    """A long stop list stays with the driver: the batch pickled to every rank is as small as
    without it."""
    stops = tuple(f"stop string number {i}" for i in range(500))
    plain = SamplingParams(max_tokens=3, temperature=0.7, top_k=5, seed=1, stop_token_ids=(9,), min_tokens=1)
    heavy = plain.with_(stop=stops)
    small = pickle.dumps(build_step_batch(_scheduled(plain), BS, [], step_id=1))
    batch = build_step_batch(_scheduled(heavy), BS, [], step_id=1)
    [row] = batch.sample_rows
    assert isinstance(row.params, RankSampling) and not hasattr(row.params, "stop")
    assert (row.params.temperature, row.params.top_k, row.params.seed, row.params.stop_token_ids,
            row.params.min_tokens) == (0.7, 5, 1, (9,), 1)
    assert len(pickle.dumps(batch)) == len(small)


# ---- hand-built steps: every list of the batch against a hand-computed layout ---------------------

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def _seq(name: str, prompt: list[int], output: list[int], blocks: list[int], placeholders: int = 0) -> Sequence:
    seq = Sequence(name, prompt, GREEDY, output_token_ids=list(output), block_ids=list(blocks))
    seq.num_placeholders = placeholders
    return seq


def _item(seq: Sequence, start: int, n: int, samples: bool, placeholder: bool = False) -> ScheduledSeq:
    return ScheduledSeq(seq, n, samples=samples, start=start, num_prior_outputs=seq.num_generated,
                        placeholder=placeholder)


def _mixed() -> tuple[SchedulerOutput, dict[str, Sequence]]:
    """Three decode rows and two prefill chunks (block size 4):

    a  prompt 10..14, output 50 51, blocks [7, 2]: decodes position 6 (token 51)
    b  prompt 20..22, output 60, blocks [5, 6, 1] (more than it needs): position 3 (token 60)
    e  prompt 70 71, output 80, blocks [11]: position 2 (token 80)
    c  prompt 30..39, blocks [9, 3, 4], first block cached: chunk of positions 4..8, no sample
    d  prompt 40 41, blocks [8]: the whole prompt, samples its first token
    """
    s = {"a": _seq("a", [10, 11, 12, 13, 14], [50, 51], [7, 2]),
         "b": _seq("b", [20, 21, 22], [60], [5, 6, 1]),
         "e": _seq("e", [70, 71], [80], [11]),
         "c": _seq("c", list(range(30, 40)), [], [9, 3, 4]),
         "d": _seq("d", [40, 41], [], [8])}
    out = SchedulerOutput(
        decodes=[_item(s["a"], 6, 1, True), _item(s["b"], 3, 1, True), _item(s["e"], 2, 1, True)],
        prefills=[_item(s["c"], 4, 5, False), _item(s["d"], 0, 2, True)])
    return out, s


def test_mixed_step_lays_out_decode_rows_then_prefill_chunks():
    out, _ = _mixed()
    batch = build_step_batch(out, BS, step_id=7)
    assert batch.input_ids == [51, 60, 80, 34, 35, 36, 37, 38, 40, 41]
    assert batch.positions == [6, 3, 2, 4, 5, 6, 7, 8, 0, 1]
    # block_ids[pos // 4] * 4 + pos % 4
    assert batch.slot_mapping == [2 * 4 + 2, 5 * 4 + 3, 11 * 4 + 2,
                                  3 * 4 + 0, 3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3, 4 * 4 + 0,
                                  8 * 4 + 0, 8 * 4 + 1]
    assert batch.num_decode == 3 and batch.num_tokens == 10
    # Two blocks wide (a's 7 tokens): b's third block is cut, e's table is padded with 0.
    assert batch.decode_block_tables == [[7, 2], [5, 6], [11, 0]]
    assert batch.decode_context_lens == [7, 4, 3]
    assert batch.prefills == [ChunkPlan(start=3, num_tokens=5, context_len=9, block_ids=[9, 3, 4]),
                              ChunkPlan(start=8, num_tokens=2, context_len=2, block_ids=[8])]
    assert batch.logits_indices == [0, 1, 2, 9]  # c's chunk does not reach its last token
    sampling = rank_sampling(GREEDY)
    assert batch.sample_rows == [SampleRow("a", sampling, 2), SampleRow("b", sampling, 1),
                                 SampleRow("e", sampling, 1), SampleRow("d", sampling, 0)]
    assert (batch.step_id, batch.kv_sends, batch.fill_rows, batch.fill_from) == (7, [], [], [])


def test_a_chunk_plan_owns_a_copy_of_the_block_table():
    out, s = _mixed()
    batch = build_step_batch(out, BS)
    s["c"].block_ids.append(99)
    assert batch.prefills[0].block_ids == [9, 3, 4]


def test_decode_only_and_prefill_only_steps():
    out, s = _mixed()
    decodes = build_step_batch(SchedulerOutput(decodes=out.decodes), BS)
    assert (decodes.input_ids, decodes.num_decode, decodes.prefills, decodes.logits_indices) == \
           ([51, 60, 80], 3, [], [0, 1, 2])
    prefills = build_step_batch(SchedulerOutput(prefills=out.prefills), BS)
    assert prefills.num_decode == 0 and prefills.decode_block_tables == [] and prefills.decode_context_lens == []
    assert [c.start for c in prefills.prefills] == [0, 5] and prefills.logits_indices == [6]
    assert prefills.slot_mapping == [12, 13, 14, 15, 16, 32, 33]


def test_an_empty_step_is_an_empty_batch():
    batch = build_step_batch(SchedulerOutput(), BS, step_id=3)
    assert batch.num_tokens == 0 and batch.num_decode == 0 and batch.step_id == 3
    assert (batch.slot_mapping, batch.decode_block_tables, batch.prefills, batch.sample_rows) == ([], [], [], [])


def test_kv_sends_ride_along():
    out, _ = _mixed()
    send = SendCommand(transfer_id=3, block_ids=[9, 3], routes=[], layers_per_message=4)
    assert build_step_batch(out, BS, [send]).kv_sends == [send]


def test_sampling_rows_number_the_sampling_sequences_in_batch_order():
    out, s = _mixed()
    assert sampling_rows(out) == {s["a"]: 0, s["b"]: 1, s["e"]: 2, s["d"]: 3}


def test_placeholders_take_their_token_from_the_previous_steps_sampling_row():
    """Async scheduling: a and b were sampled by step 4 (rows 2 and 0 there), not yet known
    on the host; step 5 decodes them with placeholder tokens the runner fills on the device."""
    a = _seq("a", [10, 11, 12], [50], [3, 6], placeholders=1)   # token 4 (position 4) is unknown
    b = _seq("b", [20, 21, 22, 23], [], [2, 8], placeholders=1)  # its first output is unknown
    c = _seq("c", [30, 31], [60, 61], [5])                       # an ordinary decode row
    out = SchedulerOutput(decodes=[_item(c, 3, 1, True), _item(a, 4, 1, True, placeholder=True),
                                   _item(b, 4, 1, True, placeholder=True)])
    batch = build_step_batch(out, BS, step_id=5, previous={a: 2, b: 0, c: 1})
    assert batch.input_ids == [61, 0, 0]
    assert batch.positions == [3, 4, 4]
    assert batch.slot_mapping == [5 * 4 + 3, 6 * 4 + 0, 8 * 4 + 0]
    assert (batch.fill_rows, batch.fill_from) == ([1, 2], [2, 0])
    assert batch.decode_context_lens == [4, 5, 5] and batch.decode_block_tables == [[5, 0], [3, 6], [2, 8]]
    assert [(r.request_id, r.num_output_tokens) for r in batch.sample_rows] == [("c", 2), ("a", 2), ("b", 1)]


@pytest.mark.parametrize("previous", [None, {}])
def test_a_placeholder_nobody_sampled_is_an_error(previous):
    a = _seq("a", [10, 11, 12], [50], [3, 6], placeholders=1)
    out = SchedulerOutput(decodes=[_item(a, 4, 1, True, placeholder=True)])
    with pytest.raises(RuntimeError, match="a: its placeholder token is not sampled by the previous step"):
        build_step_batch(out, BS, step_id=5, previous=previous)


def test_rank_sampling_copies_what_the_sampler_reads_once_per_params():
    p = SamplingParams(max_tokens=9, temperature=0.5, top_p=0.9, top_k=7, min_p=0.05, seed=3,
                       stop_token_ids=(4, 5), min_tokens=2, logprobs=1, stop=("x",))
    r = rank_sampling(p)
    assert r == RankSampling(temperature=0.5, top_p=0.9, top_k=7, min_p=0.05, seed=3, stop_token_ids=(4, 5),
                             min_tokens=2, logprobs=1, is_greedy=False)
    assert rank_sampling(p) is r and rank_sampling(p.with_(max_tokens=10)) == r
    assert rank_sampling(SamplingParams(temperature=0.0)).is_greedy
