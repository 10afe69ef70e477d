"""The group set on its own: names, configs, choosing, incarnations (no engines built)."""

from __future__ import annotations

from collections import Counter

import pytest

from splitserve.kvtransfer.messages import FaultConfig
from splitserve.workers.config import ParallelConfig
from splitserve.workers.engine import EngineConfig
from splitserve.workers.group_engine import KVUsage
from splitserve.workers.group_set import GroupSet, InOrder, KVWiring
from splitserve.workers.roles import GroupRole

WIRING = KVWiring("gloo", "127.0.0.1", 4242, FaultConfig())


class FakeEngine:
    def __init__(self, waiting: int = 0, running: int = 0, free: int = 10):
        self.num_waiting, self.num_running, self._free = waiting, running, free

    def kv_usage(self) -> KVUsage:
        return KVUsage(10, self._free, 1 - self._free / 10, 16)


class ByWaiting:
    """Fewest waiting first (the loads the policy sees are what is checked)."""

    def __init__(self):
        self.seen = []

    def rank(self, role, loads, prompt_ids):
        self.seen.append((role, loads))
        return [g.name for g in sorted(loads, key=lambda g: g.num_waiting) if g.healthy]


def _disagg(policy=None, tp=(1, 2)) -> GroupSet:
    prefill = EngineConfig(model="random:tiny-llama", parallel=ParallelConfig(tensor_parallel_size=tp[0]))
    decode = EngineConfig(model="random:tiny-llama", parallel=ParallelConfig(tensor_parallel_size=tp[1]))
    return GroupSet(prefill, decode, 2, 2, policy or InOrder(), wiring=WIRING, rank_processes=True)


def test_disaggregated_groups_are_named_and_wired_per_role():
    gs = _disagg()
    assert [(g.name, g.role) for g in gs.groups] == [
        ("prefill-0", GroupRole.PREFILL), ("prefill-1", GroupRole.PREFILL),
        ("decode-0", GroupRole.DECODE), ("decode-1", GroupRole.DECODE)]
    # GPUs in order: the prefill groups' (tp 1 each), then the decode groups' (tp 2 each)
    assert [g.config.device_offset for g in gs.groups] == [0, 1, 2, 4]
    kv = [g.config.kv for g in gs.groups]
    assert [k.role for k in kv] == ["prefill", "prefill", "decode", "decode"]
    assert all((k.transport, k.store_port, k.store_host) == ("gloo", 4242, "127.0.0.1") for k in kv)
    assert len({g.namespace for g in gs.groups}) == 4 and all(g.config.rank_processes for g in gs.groups)
    assert gs.peers(gs.prefills[0]) == gs.decodes and gs.peers(gs.decodes[1]) == gs.prefills


def test_aggregated_groups_are_workers_without_a_kv_service():
    cfg = EngineConfig(model="random:tiny-llama")
    gs = GroupSet(None, cfg, 1, 3, InOrder(), wiring=None, rank_processes=False, decode_prefix="w")
    assert gs.prefills == [] and [g.name for g in gs.decodes] == ["w-0", "w-1", "w-2"]
    assert all(g.role is GroupRole.WORKER and g.config.kv is None and g.namespace == "" for g in gs.decodes)
    assert gs.peers(gs.decodes[0]) == [] and GroupRole.WORKER.generates and not GroupRole.PREFILL.generates
    assert gs.decode_role is GroupRole.WORKER and _disagg().decode_role is GroupRole.DECODE


def test_ranking_counts_open_transfers_as_waiting_and_skips_failed_groups():
    policy = ByWaiting()
    gs = _disagg(policy)
    for g, waiting in zip(gs.decodes, (1, 0)):
        g.engine = FakeEngine(waiting=waiting)
    assert [g.name for g in gs.ranked(GroupRole.DECODE, [1])] == ["decode-1", "decode-0"]
    incoming = Counter({gs.decodes[1]: 3})  # decode-1 has three prompts on their way
    assert [g.name for g in gs.ranked(GroupRole.DECODE, [1], incoming)] == ["decode-0", "decode-1"]
    assert [load.num_waiting for load in policy.seen[-1][1]] == [1, 3]
    gs.decodes[0].error = "lost"
    assert [g.name for g in gs.ranked(GroupRole.DECODE, [1], incoming)] == ["decode-1"]
    lost = gs.decodes[0].load()
    assert (lost.healthy, lost.kv_usage, lost.num_free_blocks) == (False, 1.0, 0) and gs.failed() == [gs.decodes[0]]
    assert gs.ranked(GroupRole.PREFILL, [1]) == []  # no prefill engine built: none healthy


def test_a_new_incarnation_gets_a_fresh_namespace_and_replaces_the_old_group():
    gs = _disagg()
    old = gs.group("decode-1")
    first = gs.next_incarnation("decode-1")
    second = gs.next_incarnation("decode-1")  # an attach may have failed: never the same twice
    assert (first.name, first.role, first.index, first.restarts, second.restarts) == ("decode-1", GroupRole.DECODE, 1, 1, 2)
    assert len({old.namespace, first.namespace, second.namespace}) == 3
    assert first.config.device_offset == old.config.device_offset
    assert gs.put(second) is old and gs.group("decode-1") is second and gs.decodes.index(second) == 1
    with pytest.raises(KeyError):
        gs.group("decode-7")
