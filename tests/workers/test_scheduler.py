"""Scheduler (workers/scheduler.py) driven step by step with a real BlockManager, no model.

A step is what the engine does: ``schedule()``, the model "runs" (every row that samples gets
a fake token), ``update_from_output()`` advances the sequences, appends the tokens and finishes
those that reached ``max_tokens`` (FINISHED_LENGTH). Every step is checked against the batch invariants (budget, no row
twice, blocks cover the tokens); every scenario ends with the leak check.
"""

import zlib

import pytest

from splitserve.workers.block_manager import BlockManager
from splitserve.workers.config import SchedulerConfig
from splitserve.workers.sampler import SamplerOutput
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.scheduler import Scheduler
from splitserve.workers.sequence import Sequence, SequenceStatus

BS = 4


# ---- helpers -----------------------------------------------------------------------------


def make_sched(num_blocks=64, budget=16, max_seqs=8, chunked=True, prefix=True):
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=prefix)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                             enable_chunked_prefill=chunked)
    return Scheduler(config, bm)


def make_seq(rid, prompt, max_tokens=4):
    if isinstance(prompt, int):  # a prompt of that many tokens unique to this request
        base = zlib.crc32(rid.encode()) % 30000
        prompt = [base + i for i in range(prompt)]
    return Sequence(rid, list(prompt), SamplingParams(max_tokens=max_tokens))


def fake_token(seq):
    return 1000 + seq.num_output_tokens


def sampled_for(out):
    """What the model "returns" for a batch: a fake token for every row that samples."""
    tokens = [fake_token(item.seq) for item in out.scheduled if item.samples]
    return SamplerOutput(tokens, [None] * len(tokens))


def rows(items):
    return [(item.seq.request_id, item.num_new_tokens, item.samples) for item in items]


def check_batch(sched, out):
    """What every SchedulerOutput must satisfy, whatever the scenario."""
    assert out.num_tokens <= sched.config.max_num_batched_tokens
    assert len(sched.running) <= sched.config.max_num_seqs
    ids = [item.seq.request_id for item in out.scheduled]
    assert len(ids) == len(set(ids))
    assert out.scheduled == out.decodes + out.prefills
    for item in out.decodes:
        assert item.num_new_tokens == 1 and item.samples
    for item in out.scheduled:
        seq = item.seq
        assert item.num_new_tokens > 0
        assert seq in sched.running and seq.status is SequenceStatus.RUNNING
        end = seq.num_computed_tokens + item.num_new_tokens
        assert end <= seq.num_tokens
        assert item.samples == (end == seq.num_tokens)
        assert len(seq.block_ids) >= sched.block_manager.blocks_needed(end)
    for seq in out.preempted:
        assert seq not in sched.running and seq.block_ids == []
        assert seq.num_computed_tokens == 0 and seq.status is SequenceStatus.WAITING


def step(sched):
    out = sched.schedule()
    check_batch(sched, out)
    sched.update_from_output(out, sampled_for(out))
    return out


def run(sched, max_steps=200):
    outs = []
    while sched.num_unfinished:
        outs.append(step(sched))
        assert len(outs) < max_steps, "scheduler made no progress"
    assert_no_leak(sched)
    return outs


def assert_no_leak(sched):
    bm = sched.block_manager
    assert not sched.running and not sched.waiting
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def assert_finished(seq):
    assert seq.status is SequenceStatus.FINISHED_LENGTH
    assert seq.block_ids == []
    assert seq.output_token_ids == [1000 + i for i in range(seq.params.max_tokens)]


# ---- budget and ordering -----------------------------------------------------------------


@pytest.mark.parametrize("chunked,budget", [(True, 8), (False, 32)])
def test_budget_is_never_exceeded_and_everyone_finishes(chunked, budget):
    sched = make_sched(budget=budget, max_seqs=4, chunked=chunked)
    seqs = [make_seq(f"s{i}", n, m)
            for i, (n, m) in enumerate([(3, 4), (17, 2), (9, 5), (30, 3), (1, 6), (12, 1)])]
    for s in seqs:
        sched.add(s)
    outs = run(sched)
    assert all(out.num_tokens <= budget for out in outs)
    if chunked:
        assert max(out.num_tokens for out in outs) == budget  # the budget was the limit
    for s in seqs:
        assert_finished(s)
    # Every prompt token and every non-final output token was computed exactly once.
    computed = sum(out.num_tokens for out in outs)
    assert computed == sum(s.num_prompt_tokens + s.num_output_tokens - 1 for s in seqs)


def test_decodes_come_first_and_get_budget_before_prefills():
    sched = make_sched(budget=4)
    decoders = [make_seq(f"d{i}", 1, max_tokens=5) for i in range(3)]
    long = make_seq("long", 10, max_tokens=1)
    for s in decoders + [long]:
        sched.add(s)
    first = step(sched)
    assert rows(first.prefills) == [("d0", 1, True), ("d1", 1, True), ("d2", 1, True),
                                    ("long", 1, False)]
    for _ in range(3):
        out = step(sched)
        assert rows(out.decodes) == [("d0", 1, True), ("d1", 1, True), ("d2", 1, True)]
        assert rows(out.prefills) == [("long", 1, False)]  # only what the decodes left
        assert [i.seq for i in out.scheduled[:3]] == decoders
    run(sched)
    assert long.status is SequenceStatus.FINISHED_LENGTH


def test_chunked_prefill_splits_a_long_prompt_and_samples_on_the_last_chunk():
    sched = make_sched(budget=16)
    seq = make_seq("p", 40, max_tokens=2)
    sched.add(seq)
    got = []
    for _ in range(3):
        out = step(sched)
        assert out.decodes == []
        got += rows(out.prefills)
        assert len(seq.block_ids) == sched.block_manager.blocks_needed(seq.num_computed_tokens)
    assert got == [("p", 16, False), ("p", 16, False), ("p", 8, True)]
    assert seq.num_computed_tokens == 40 and seq.output_token_ids == [1000]
    out = step(sched)
    assert rows(out.decodes) == [("p", 1, True)]
    assert_finished(seq)
    assert_no_leak(sched)


def test_waiting_prompt_gets_only_the_budget_a_running_prefill_leaves():
    sched = make_sched(budget=16)
    a, b = make_seq("a", 20, max_tokens=1), make_seq("b", 20, max_tokens=1)
    sched.add(a), sched.add(b)
    assert rows(step(sched).prefills) == [("a", 16, False)]
    assert rows(step(sched).prefills) == [("a", 4, True), ("b", 12, False)]
    assert a.is_finished
    assert rows(step(sched).prefills) == [("b", 8, True)]
    assert_no_leak(sched)


def test_without_chunking_a_prompt_waits_until_it_fits_the_budget_whole():
    sched = make_sched(budget=16, chunked=False)
    a, b = make_seq("a", 4, max_tokens=3), make_seq("b", 16, max_tokens=1)
    sched.add(a), sched.add(b)
    assert rows(step(sched).prefills) == [("a", 4, True)]  # b would need 16 of the 12 left
    out = step(sched)
    assert rows(out.decodes) == [("a", 1, True)] and out.prefills == []
    out = step(sched)
    assert rows(out.decodes) == [("a", 1, True)] and out.prefills == []
    assert a.is_finished and b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert rows(step(sched).prefills) == [("b", 16, True)]
    assert_no_leak(sched)


def test_without_chunking_a_prompt_larger_than_the_budget_is_never_split():
    sched = make_sched(budget=16, chunked=False)
    big = make_seq("big", 20)
    sched.add(big)
    for _ in range(3):
        assert sched.schedule().is_empty
    assert list(sched.waiting) == [big] and big.block_ids == []
    sched.finish(big, SequenceStatus.FINISHED_ABORTED)
    assert big.finish_reason == "abort"
    assert_no_leak(sched)


def test_max_num_seqs_caps_running():
    sched = make_sched(budget=64, max_seqs=2)
    seqs = [make_seq(f"s{i}", 2, max_tokens=3) for i in range(5)]
    for s in seqs:
        sched.add(s)
    first_step = {}
    for n, out in enumerate(run(sched)):
        for item in out.prefills:
            first_step.setdefault(item.seq.request_id, n)
    assert first_step == {"s0": 0, "s1": 0, "s2": 3, "s3": 3, "s4": 6}
    for s in seqs:
        assert_finished(s)


def test_admission_is_first_come_first_served():
    sched = make_sched(budget=8)
    seqs = [make_seq(f"s{i}", 5, max_tokens=2) for i in range(5)]
    for s in seqs:
        sched.add(s)
    admitted = []
    for out in run(sched):
        admitted += [i.seq.request_id for i in out.prefills if i.seq.request_id not in admitted]
    assert admitted == [s.request_id for s in seqs]


def test_a_prompt_that_does_not_fit_the_cache_blocks_later_ones():
    """Strict FCFS: a small prompt does not overtake a large one waiting for KV blocks."""
    sched = make_sched(num_blocks=4, budget=32)
    a, b, c = make_seq("a", 8, max_tokens=1), make_seq("b", 12, 2), make_seq("c", 2, 2)
    for s in (a, b, c):
        sched.add(s)
    out = step(sched)
    assert rows(out.prefills) == [("a", 8, True)]  # b needs 3 blocks, 2 are free; c waits too
    assert list(sched.waiting) == [b, c]
    assert rows(step(sched).prefills) == [("b", 12, True), ("c", 2, True)]
    run(sched)


# ---- preemption --------------------------------------------------------------------------


def test_preemption_frees_the_latest_arrival_and_admits_nothing_that_step():
    # 4 blocks of 4 tokens, budget 5. a (prompt 4) and b (prompt 1) decode until a's third
    # block is needed with no block free: b, the latest arrival, is preempted.
    sched = make_sched(num_blocks=4, budget=5, prefix=False)
    bm = sched.block_manager
    a, b = make_seq("a", 4, max_tokens=8), make_seq("b", 1, max_tokens=8)
    sched.add(a), sched.add(b)
    for _ in range(5):
        out = step(sched)
        assert not out.preempted
    assert bm.num_free_blocks == 0 and b.output_token_ids == [1000 + i for i in range(5)]

    out = sched.schedule()
    check_batch(sched, out)
    assert out.preempted == [b]
    assert rows(out.decodes) == [("a", 1, True)]
    assert out.prefills == []
    assert sched.running == [a] and list(sched.waiting) == [b]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_ids == [] and b.num_preemptions == 1
    assert b.output_token_ids == [1000 + i for i in range(5)]  # outputs are kept
    # b's first chunk (4 tokens of the budget left) would fit the freed block: it is held
    # back only because this step preempted.
    left = sched.config.max_num_batched_tokens - out.num_tokens
    assert bm.can_allocate(b, min(b.num_tokens, left))
    sched.update_from_output(out, sampled_for(out))

    recompute = []
    for out in run(sched):
        recompute += [i for i in out.scheduled if i.seq is b]
    assert_finished(a), assert_finished(b)
    # b recomputed its prompt and the outputs it had before sampling anything new.
    assert b.num_preemptions >= 1
    assert recompute[0].seq is b and not recompute[0].samples


@pytest.mark.parametrize("prefix", [False, True], ids=["no_cache", "prefix_cache"])
def test_preempted_sequence_goes_to_the_front_of_the_queue_and_finishes(prefix):
    # 6 blocks: a, b, c (prompts of one block) fill them all by their 5th token.
    sched = make_sched(num_blocks=6, budget=16, prefix=prefix)
    a, b, c = (make_seq(r, 4, max_tokens=8) for r in "abc")
    for s in (a, b, c):
        sched.add(s)
    for _ in range(4):
        assert not step(sched).preempted
    d = make_seq("d", 2, max_tokens=2)  # arrives when no block is free
    sched.add(d)
    assert not step(sched).preempted and list(sched.waiting) == [d]

    out = step(sched)  # a and b need their third block: c, the latest arrival, goes
    assert out.preempted == [c]
    assert rows(out.decodes) == [("a", 1, True), ("b", 1, True)] and out.prefills == []
    assert list(sched.waiting) == [c, d]
    assert c.num_computed_tokens == 0 and len(c.output_token_ids) == 5

    run(sched)
    for s in (a, b, c, d):
        assert_finished(s)
    assert c.num_cached_tokens == 0  # a recompute hit is not a prompt-cache hit


def test_a_sequence_that_cannot_grow_preempts_itself_when_it_is_the_latest():
    sched = make_sched(num_blocks=3, budget=16, prefix=False)
    a, b = make_seq("a", 4, max_tokens=3), make_seq("b", 4, max_tokens=3)
    sched.add(a), sched.add(b)
    step(sched)
    out = step(sched)  # both need a second block; a takes the only free one, b gives way
    assert rows(out.decodes) == [("a", 1, True)]
    assert out.preempted == [b] and list(sched.waiting) == [b]
    run(sched)
    assert_finished(a), assert_finished(b)


def test_without_chunking_a_preempted_sequence_is_rescheduled_and_finishes():
    """Preemption makes a sequence recompute prompt + outputs. Without chunked prefill that
    recompute must still be schedulable even once it exceeds the per-step token budget,
    or the sequence (and every request queued behind it) waits forever."""
    # 5 blocks, budget 8: a and b (prompts of 4) decode until b is preempted holding 9 tokens.
    sched = make_sched(num_blocks=5, budget=8, chunked=False, prefix=False)
    a, b = make_seq("a", 4, max_tokens=8), make_seq("b", 4, max_tokens=8)
    sched.add(a), sched.add(b)
    preempted = []
    for _ in range(60):
        if not sched.num_unfinished:
            break
        out = step(sched)
        preempted += out.preempted
    assert preempted and preempted[0] is b
    assert a.is_finished
    assert b.is_finished, (
        f"b waits forever: {b.num_tokens} tokens to recompute > budget "
        f"{sched.config.max_num_batched_tokens}, and chunking is off")
    assert_finished(b)
    assert_no_leak(sched)


# ---- prefix cache ------------------------------------------------------------------------


def test_prefix_cache_hit_skips_the_cached_tokens():
    sched = make_sched(budget=64)
    shared = list(range(100, 108))
    first = make_seq("first", shared + [1, 2], max_tokens=1)
    sched.add(first)
    run(sched)

    hit = make_seq("hit", shared + [7, 8, 9], max_tokens=2)
    exact = make_seq("exact", shared, max_tokens=2)  # last token is never served from cache
    miss = make_seq("miss", [5] + shared, max_tokens=2)
    for s in (hit, exact, miss):
        sched.add(s)
    out = sched.schedule()
    check_batch(sched, out)
    assert rows(out.prefills) == [("hit", 3, True), ("exact", 4, True), ("miss", 9, True)]
    assert (hit.num_computed_tokens, hit.num_cached_tokens) == (8, 8)
    assert (exact.num_computed_tokens, exact.num_cached_tokens) == (4, 4)
    assert (miss.num_computed_tokens, miss.num_cached_tokens) == (0, 0)
    assert hit.block_ids[0] == exact.block_ids[0]  # one cached block, two readers
    sched.update_from_output(out, sampled_for(out))
    run(sched)
    for s in (hit, exact, miss):
        assert_finished(s)


def test_disabled_prefix_cache_computes_everything():
    sched = make_sched(budget=64, prefix=False)
    shared = list(range(100, 108))
    sched.add(make_seq("first", shared + [1], max_tokens=1))
    run(sched)
    again = make_seq("again", shared + [1], max_tokens=1)
    sched.add(again)
    out = step(sched)
    assert rows(out.prefills) == [("again", 9, True)] and again.num_cached_tokens == 0
    assert_no_leak(sched)


def test_in_flight_sequences_are_not_rescheduled_or_preempted():
    bm = BlockManager(6, 4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), bm)
    a, b = Sequence("a", [1] * 8, SamplingParams(max_tokens=4)), Sequence("b", [2] * 8, SamplingParams(max_tokens=4))
    sched.add(a)
    sched.add(b)
    first = sched.schedule(max_seqs=1)
    assert [s.seq for s in first.scheduled] == [a] and a.in_flight
    second = sched.schedule(max_seqs=1)
    assert [s.seq for s in second.scheduled] == [b]  # a is in flight: b gets the next micro-batch
    assert sched.schedule().is_empty and not sched.has_schedulable()
    sched.update_from_output(first, sampled_for(first))
    assert not a.in_flight and sched.has_schedulable()
    sched.update_from_output(second, sampled_for(second))
    for seq in (a, b):
        sched.finish(seq, SequenceStatus.FINISHED_ABORTED)
    assert bm.num_free_blocks == bm.num_blocks


def test_lookahead_schedules_the_sampled_token_before_it_is_known():
    bm = BlockManager(16, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), bm, lookahead=True, max_model_len=64)
    a = Sequence("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=3))
    last = Sequence("last", [6, 7], SamplingParams(max_tokens=1))
    sched.add(a)
    sched.add(last)
    first = sched.schedule()
    assert [s.num_new_tokens for s in first.prefills] == [5, 2] and all(s.samples for s in first.prefills)
    # Step 2 while step 1 runs: a's sampled token is a placeholder at position 5; "last" ends
    # with the token step 1 samples (max_tokens=1), so it is not scheduled again.
    second = sched.schedule()
    [item] = second.decodes
    assert (item.seq, item.start, item.placeholder, item.samples, item.num_prior_outputs) == (a, 5, True, True, 1)
    assert len(a.block_ids) == 2 and not sched.has_schedulable()  # 6 tokens need 2 blocks of 4
    sched.update_from_output(first, SamplerOutput([9, 8], [None, None]))  # step 1's tokens
    assert a.in_flight and a.num_computed_tokens == 5 and a.num_placeholders == 1
    assert a.output_token_ids == [9] and last.status is SequenceStatus.FINISHED_LENGTH
    sched.update_from_output(second, SamplerOutput([7], [None]))
    assert not a.in_flight and a.num_computed_tokens == 6 and a.num_placeholders == 0
    sched.finish(a, SequenceStatus.FINISHED_STOPPED)
    assert bm.num_free_blocks == bm.num_blocks


# ---- isolation (suspects of a step that raised) ------------------------------------------


def test_isolated_sequences_run_alone_every_other_batch_and_everyone_finishes():
    sched = make_sched(budget=16)
    seqs = [make_seq(f"s{i}", 5, max_tokens=3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    for s in seqs[1:3]:  # one waiting at the head's back, one further on
        sched.isolate(s)
    outs = run(sched)
    for s in seqs:
        assert_finished(s)
    isolated = {"s1", "s2"}
    for out in outs:
        ids = {item.seq.request_id for item in out.scheduled}
        assert len(ids) == 1 or not ids & isolated, ids  # an isolated one is always alone
    kinds = ["iso" if {i.seq.request_id for i in o.scheduled} & isolated else "rest" for o in outs]
    rest = [i for i, k in enumerate(kinds) if k == "rest"]
    assert rest and rest[0] <= 1  # the others were not made to wait for the isolated ones
    both = min(max(i for i, k in enumerate(kinds) if k == "iso"), max(rest))
    assert all(kinds[i] != kinds[i + 1] for i in range(both))  # alternating while both had work
    assert not sched.is_isolated(seqs[1])  # forgotten once finished


def test_requeue_and_discard_after_a_lost_batch():
    """A batch that raised: `discard` takes it back, `requeue` computes the sequence again."""
    sched = make_sched(budget=16)
    a, b = make_seq("a", 6, max_tokens=2), make_seq("b", 3, max_tokens=2)
    sched.add(a)
    sched.add(b)
    step(sched)  # both prompts computed, first tokens sampled
    out = sched.schedule()  # the decode batch that "raises"
    assert {i.seq.request_id for i in out.scheduled} == {"a", "b"}
    sched.discard(out)
    assert not a.in_flight and a.num_computed_tokens == 6 and a.num_placeholders == 0
    sched.requeue(a)
    assert a.status is SequenceStatus.WAITING and a.block_ids == [] and sched.waiting[0] is a
    assert a.output_token_ids == [1000]  # its tokens stay: prompt + output are computed again
    outs = run(sched)
    assert_finished(a)
    assert_finished(b)
    assert outs[0].prefills[0].seq is a and outs[0].prefills[0].num_new_tokens in (3, 7)  # prefix hit or not


# ---- update_from_output (the one writer of a request's progress) --------------------------


def test_update_from_output_advances_appends_and_retires_in_one_place():
    bm = BlockManager(16, BS)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), bm, eos_token_ids=(2,), max_model_len=8)
    eos = Sequence("eos", [5, 6, 7], SamplingParams(max_tokens=5, logprobs=0))
    long = Sequence("long", [5, 6, 7, 8, 9, 10, 11], SamplingParams(max_tokens=5))  # reaches the model's length
    on = Sequence("on", [9, 9], SamplingParams(max_tokens=5))
    for s in (eos, long, on):
        sched.add(s)
    out = sched.schedule()
    updates = sched.update_from_output(out, SamplerOutput([2, 3, 4], ["lp", None, None]))
    assert [(u.seq.request_id, u.stop and u.stop.finish_reason) for u in updates] == [
        ("eos", "stop"), ("long", "length"), ("on", None)]
    assert eos.status is SequenceStatus.FINISHED_STOPPED and eos.logprobs == ["lp"] and eos.block_ids == []
    assert long.status is SequenceStatus.FINISHED_LENGTH and long.output_token_ids == [3]
    assert on.num_computed_tokens == 2 and on.output_token_ids == [4] and sched.running == [on]
    sched.finish(on, SequenceStatus.FINISHED_ABORTED)
    assert bm.num_free_blocks == bm.num_blocks


def test_update_from_output_gives_no_token_to_a_sequence_that_ended_in_flight():
    bm = BlockManager(16, BS)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), bm)
    a = make_seq("a", 6)
    sched.add(a)
    out = sched.schedule()
    sched.finish(a, SequenceStatus.FINISHED_ABORTED)
    assert a.block_ids  # its batch still writes them
    assert sched.update_from_output(out, sampled_for(out)) == []
    assert a.output_token_ids == [] and a.block_ids == [] and bm.num_free_blocks == bm.num_blocks


def test_update_from_output_asks_the_text_for_stop_strings_and_the_hook_for_the_blocks():
    bm = BlockManager(16, BS)
    kept = []
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), bm,
                      on_finished=lambda seq, status: kept.append((seq.request_id, status)) or True)
    a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=9, stop=("END",)))
    sched.add(a)
    out = sched.schedule()
    text = {"a": "the END"}
    [update] = sched.update_from_output(out, SamplerOutput([7], [None]), lambda seq, token: (text[seq.request_id], 7))
    assert (update.stop.stop_reason, update.stop.truncate_to) == ("END", 4) and a.stop_reason == "END"
    assert kept == [("a", SequenceStatus.FINISHED_STOPPED)] and a.block_ids  # kept: the hook's to free
    sched.free_blocks(a)
    assert bm.num_free_blocks == bm.num_blocks


def test_reserve_and_admit_prefilled_record_the_hits_and_the_prompt_as_computed():
    bm = BlockManager(16, BS)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), bm)
    first = make_seq("first", list(range(100, 109)), max_tokens=1)
    sched.add(first)
    run(sched)
    seq = make_seq("r", list(range(100, 109)), max_tokens=3)
    assert sched.reserve(seq, num_extra=1)
    assert seq.num_computed_tokens == seq.num_cached_tokens == 8 and len(seq.block_ids) == 3
    sched.admit_prefilled(seq)
    assert seq.num_computed_tokens == 9 and sched.running == [seq] and seq.num_registered_blocks == 2
    sched.append_token(seq, 1000, None)
    run(sched)
    assert_finished(seq)
    tiny = BlockManager(2, BS)
    full = Scheduler(SchedulerConfig(max_num_batched_tokens=64), tiny)
    assert not full.reserve(make_seq("big", 9), num_extra=1) and tiny.num_free_blocks == 2
