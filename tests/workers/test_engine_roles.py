"""Engine roles (workers/engine_roles.py): the hooks `LLMEngine` calls, driven here with a real
Scheduler and BlockManager, no model: what a step sends, which finished sequences keep their
blocks, what a failure or a lost group gives back."""

from splitserve.workers.block_manager import BlockManager
from splitserve.workers.config import SchedulerConfig
from splitserve.workers.engine_roles import (DecodeRole, EngineRole, KVSendHook, PrefillRole, SendPlan,
                                             first_token_params, make_role)
from splitserve.workers.roles import GroupRole
from splitserve.workers.sampler import SamplerOutput
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.scheduler import Scheduler
from splitserve.workers.sequence import Sequence, SequenceStatus

BS = 4


def make(role_kind, num_blocks=16, budget=64):
    holder = {}
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget), BlockManager(num_blocks, BS),
                      on_finished=lambda seq, status: holder["role"].on_finished(seq, status))
    holder["role"] = role = make_role(role_kind, sched)
    return sched, role


def prompt(rid, n, max_tokens=1):
    return Sequence(rid, list(range(10, 10 + n)), first_token_params(SamplingParams(max_tokens=max_tokens)))


def all_free(sched):
    bm = sched.block_manager
    return bm.num_free_blocks == bm.num_blocks


def test_make_role_picks_the_role_of_the_group():
    sched = Scheduler(SchedulerConfig(), BlockManager(4, BS))
    assert type(make_role(GroupRole.WORKER, sched)) is EngineRole
    assert isinstance(make_role(GroupRole.PREFILL, sched), PrefillRole)
    assert isinstance(make_role(GroupRole.DECODE, sched), DecodeRole)
    assert not PrefillRole.generates and EngineRole.generates and DecodeRole.generates


def test_null_role_sends_nothing_and_keeps_nothing():
    sched, role = make(GroupRole.WORKER)
    seq = prompt("a", 6)
    sched.add(seq)
    out = sched.schedule()
    assert role.on_scheduled(out) == []
    sched.update_from_output(out, SamplerOutput([5], [None]))
    assert seq.is_finished and not role.holds("a") and all_free(sched)


def test_prefill_sends_with_the_last_chunk_only_and_holds_until_release():
    sched, role = make(GroupRole.PREFILL, budget=8)
    sent = []
    role.enable_sends(KVSendHook(["route"], 2, lambda cmds: sent.extend(cmds) or cmds))
    seq = prompt("a", 10)  # two chunks of 8 and 2 tokens: 3 blocks of 4
    sched.add(seq)
    role.add("a", SendPlan(transfer_id=7, skip_blocks=1, peer_namespace="d0/"))
    first = sched.schedule()
    assert role.on_scheduled(first) == [] and sent == []  # the first chunk does not sample
    sched.update_from_output(first, SamplerOutput([], []))
    last = sched.schedule()
    [cmd] = role.on_scheduled(last)
    assert (cmd.transfer_id, cmd.block_ids, cmd.routes, cmd.layers_per_message, cmd.peer_namespace) == (
        7, seq.block_ids[1:3], ["route"], 2, "d0/")
    assert sent == [cmd] and role.on_scheduled(last) == []  # a plan is used once
    sched.update_from_output(last, SamplerOutput([5], [None]))
    assert seq.status is SequenceStatus.FINISHED_LENGTH and role.holds("a") and not all_free(sched)
    role.release("a")
    assert not role.holds("a") and all_free(sched)


def test_prefill_without_a_hook_sends_nothing_and_keeps_the_plan():
    sched, role = make(GroupRole.PREFILL)
    seq = prompt("a", 3)
    sched.add(seq)
    role.add("a", SendPlan(1, 0))
    out = sched.schedule()
    assert role.on_scheduled(out) == []
    sent = []
    role.enable_sends(KVSendHook([], 1, lambda cmds: sent.extend(cmds) or cmds))
    sched.discard(out)  # the batch was lost: the prompt is computed again
    sched.requeue(seq)
    assert [c.transfer_id for c in role.on_scheduled(sched.schedule())] == [1] and sent


def test_prefill_frees_an_aborted_prompt_and_forgets_a_failed_one():
    sched, role = make(GroupRole.PREFILL)
    seq = prompt("a", 6)
    sched.add(seq)
    role.add("a", SendPlan(1, 0))
    role.on_dropped("a")  # failed here with an error: its KV never goes out
    sched.finish(seq, SequenceStatus.FINISHED_ABORTED)
    assert not role.holds("a") and all_free(sched)
    role.enable_sends(KVSendHook([], 1, lambda cmds: cmds))
    again = prompt("a", 6)
    sched.add(again)
    assert role.on_scheduled(sched.schedule()) == []  # the dropped plan is gone


def test_prefill_gives_every_held_block_back_when_the_group_is_lost():
    sched, role = make(GroupRole.PREFILL)
    seqs = [prompt(f"r{i}", 5) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    sched.update_from_output(out, SamplerOutput([1, 2, 3], [None] * 3))
    assert all(role.holds(s.request_id) for s in seqs) and not all_free(sched)
    role.release_all()
    assert not any(role.holds(s.request_id) for s in seqs) and all_free(sched)


def test_decode_reserves_admits_and_cancels():
    sched, role = make(GroupRole.DECODE, num_blocks=4)
    seq = Sequence("a", list(range(9)), SamplingParams(max_tokens=3))
    assert role.reserve(seq) and role.num_reserved == 1
    assert len(seq.block_ids) == 3  # 9 prompt tokens + the first token: 10 tokens
    too_big = Sequence("b", list(range(9)), SamplingParams(max_tokens=3))
    assert not role.reserve(too_big) and role.num_reserved == 1 and too_big.block_ids == []
    role.admit(seq)
    assert role.num_reserved == 0 and sched.running == [seq] and seq.num_computed_tokens == 9
    sched.append_token(seq, 42, None)
    sched.finish(seq, SequenceStatus.FINISHED_ABORTED)
    other = Sequence("c", [1, 2], SamplingParams())
    assert role.reserve(other)
    role.cancel(other)
    assert role.num_reserved == 0 and other.block_ids == [] and all_free(sched)
