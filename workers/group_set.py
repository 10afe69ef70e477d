"""The disaggregated engine's worker groups: who they are, how they are chosen, how one is replaced.

A *worker group* is one `GroupEngine` over its ranks, with a role (`GroupRole`): prefill groups
compute prompts and push their KV; decode groups receive it and generate; without prefill
groups the groups are aggregated (role ``worker``: each runs its requests whole). The set
owns the list of groups of each role and the incarnation count of each name:

    build        `GroupSet(...)` names the groups ``<prefix>-<i>`` and gives each its
                 `EngineConfig` (its KV namespace, transport and GPUs); the driver builds
                 their engines
    choose       `ranked(role, prompt_ids, incoming)`: the policy's order over the healthy
                 groups of a role, from their loads (a decode group's open transfers count
                 as load it has taken on)
    fail         the driver sets `Group.error`; a failed group validates and is ranked nowhere
    replace      `next_incarnation(name)` gives a fresh `Group` (a new namespace: fresh KV
                 links), its engine is built (slow, any thread), `put(group)` puts it in
                 place of the lost one and returns the old one for the driver to shut down
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, replace
from typing import Protocol

from splitserve.kvtransfer.agent import KVAgentSpec
from splitserve.kvtransfer.messages import FaultConfig
from splitserve.workers.engine import EngineConfig
from splitserve.workers.group_engine import GroupEngine
from splitserve.workers.roles import GroupRole


@dataclass(frozen=True)
class GroupLoad:
    """What a policy sees of a group when it chooses."""

    name: str
    role: GroupRole
    index: int
    healthy: bool
    num_waiting: int
    num_running: int
    kv_usage: float
    num_free_blocks: int


class GroupPolicy(Protocol):
    def rank(self, role: GroupRole, loads: list[GroupLoad], prompt_ids: list[int]) -> list[str]:
        """The healthy groups' names, best first, for this request."""


class InOrder:
    """The default policy: healthy groups in index order (one group per role: no choice)."""

    def rank(self, role: GroupRole, loads: list[GroupLoad], prompt_ids: list[int]) -> list[str]:
        return [g.name for g in loads if g.healthy]


@dataclass(eq=False)
class Group:
    name: str
    role: GroupRole
    index: int
    config: EngineConfig
    engine: GroupEngine | None = None
    #: Why it failed (None while it works); it stays out of every choice until replaced.
    error: str | None = None
    failed_at: float = 0.0
    restarts: int = 0

    @property
    def healthy(self) -> bool:
        return self.engine is not None and self.error is None

    @property
    def namespace(self) -> str:
        return self.config.kv.namespace if self.config.kv is not None else ""

    def load(self) -> GroupLoad:
        if not self.healthy:
            return GroupLoad(self.name, self.role, self.index, False, 0, 0, 1.0, 0)
        e = self.engine
        kv = e.kv_usage()
        return GroupLoad(self.name, self.role, self.index, True, e.num_waiting, e.num_running,
                         kv.usage, kv.num_free_blocks)


@dataclass(frozen=True)
class KVWiring:
    """How the groups' KV agents meet (None on `GroupSet`: aggregated groups, no KV service)."""

    transport: str
    store_host: str
    store_port: int
    faults: FaultConfig


class GroupSet:
    def __init__(self, prefill: EngineConfig | None, decode: EngineConfig, num_prefill: int, num_decode: int,
                 policy: GroupPolicy, *, wiring: KVWiring | None, rank_processes: bool,
                 decode_prefix: str | None = None):
        self._configs = {GroupRole.PREFILL: prefill, GroupRole.DECODE: decode, GroupRole.WORKER: decode}
        self._num_prefill = num_prefill if prefill is not None else 0
        self._wiring = wiring
        self._rank_processes = rank_processes
        self._uid = uuid.uuid4().hex[:8]
        self.policy = policy
        #: The latest incarnation handed out per group name (`next_incarnation`).
        self._incarnations: dict[str, int] = {}
        #: The role of the groups requests generate on: decode, or worker without prefill groups.
        self.decode_role = GroupRole.DECODE if prefill is not None else GroupRole.WORKER
        self.prefills = [self._new(GroupRole.PREFILL, i) for i in range(self._num_prefill)]
        self.decodes = [self._new(self.decode_role, i, decode_prefix) for i in range(num_decode)]

    @property
    def groups(self) -> list[Group]:
        return self.prefills + self.decodes

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def failed(self) -> list[Group]:
        return [g for g in self.groups if g.error is not None]

    def peers(self, group: Group) -> list[Group]:
        """The groups at the other end of ``group``'s KV links (none for aggregated groups)."""
        if group.role is GroupRole.WORKER:
            return []
        return self.decodes if group.role is GroupRole.PREFILL else self.prefills

    # ---- choosing --------------------------------------------------------------------------

    def loads(self, role: GroupRole, incoming: Counter | None = None) -> list[GroupLoad]:
        """Each group's load; ``incoming``: open transfers per decode group, counted as waiting
        (without them a burst of requests would all rank the same group first)."""
        if role is GroupRole.PREFILL:
            return [g.load() for g in self.prefills]
        incoming = incoming or Counter()
        return [replace(load, num_waiting=load.num_waiting + incoming[g])
                for g in self.decodes for load in (g.load(),)]

    def ranked(self, role: GroupRole, prompt_ids: list[int], incoming: Counter | None = None) -> list[Group]:
        names = self.policy.rank(role, self.loads(role, incoming), prompt_ids)
        return [g for g in map(self.group, names) if g.healthy]

    # ---- replacing -------------------------------------------------------------------------

    def next_incarnation(self, name: str) -> Group:
        """A fresh incarnation of a lost group, engine not built yet; safe from another thread."""
        old = self.group(name)
        prefix = old.name.rsplit("-", 1)[0]
        # Never one handed out before: an incarnation whose attach failed may have left KV
        # links under its namespace on the other side.
        restarts = self._incarnations[name] = max(old.restarts, self._incarnations.get(name, 0)) + 1
        return self._new(old.role, old.index, prefix, restarts)

    def put(self, group: Group) -> Group:
        """``group`` takes the place of the one of its name, which is returned."""
        members = self.prefills if group.role is GroupRole.PREFILL else self.decodes
        old = self.group(group.name)
        members[members.index(old)] = group
        return old

    def _new(self, role: GroupRole, index: int, prefix: str | None = None, restarts: int = 0) -> Group:
        name = f"{prefix or role.value}-{index}"
        return Group(name, role, index, self._config(role, index, name, restarts), restarts=restarts)

    def _config(self, role: GroupRole, index: int, name: str, restarts: int) -> EngineConfig:
        cfg = self._configs[role]
        if self._wiring is None:  # aggregated groups: no KV service
            return replace(cfg, device_offset=index * cfg.parallel.world_size)
        w = self._wiring
        # Each incarnation has its own namespace: a rejoining group gets fresh KV links.
        namespace = f"{self._uid}/{name}.{restarts}/"
        kv = KVAgentSpec(role.value, w.transport, namespace, w.store_host, w.store_port, faults=w.faults)
        # Groups of this machine take GPUs in order: the prefill groups', then the decode groups'.
        before = 0 if role is GroupRole.PREFILL else self._num_prefill * self._configs[GroupRole.PREFILL].parallel.world_size
        return replace(cfg, kv=kv, rank_processes=self._rank_processes,
                       device_offset=before + index * cfg.parallel.world_size)
