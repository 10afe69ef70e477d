"""workers/step_batch.py: a step's work as plain data for the ranks. Decode rows come first,
every sampling row carries only what the sampling rank reads."""

from __future__ import annotations

import pickle

from splitserve.workers.block_manager import BlockManager
from splitserve.workers.config import SchedulerConfig
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.scheduler import Scheduler
from splitserve.workers.sequence import Sequence
from splitserve.workers.step_batch import RankSampling, build_step_batch

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
