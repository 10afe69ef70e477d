"""How the router picks a group for a request, behind a registry.

Each policy ranks the healthy groups of one role for one request (best first); the engine
tries them in that order (a decode group without free blocks is skipped for the next).

- ``round_robin``: in turn, whatever their load.
- ``least_loaded``: fewest queued + running requests, then lowest KV-cache usage.
- ``prefix_affinity``: the hash of the prompt's leading blocks picks a group (rendezvous
  hashing: the same prefix lands on the same group, which is likely to have it cached, and
  losing a group moves only that group's prefixes); prompts shorter than one block, and a
  chosen group much busier than the least-loaded one, fall back to ``least_loaded``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable

from splitserve.workers.disagg_engine import GroupLoad, GroupPolicy

POLICIES: dict[str, Callable[..., GroupPolicy]] = {}


def register(name: str):
    def wrap(cls):
        POLICIES[name] = cls
        return cls
    return wrap


def make_policy(name: str, block_size: int = 16) -> GroupPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown router policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name](block_size=block_size)


def _healthy(loads: list[GroupLoad]) -> list[GroupLoad]:
    return [g for g in loads if g.healthy]


def _by_load(loads: list[GroupLoad]) -> list[GroupLoad]:
    return sorted(_healthy(loads), key=lambda g: (g.num_waiting + g.num_running, g.kv_usage, g.index))


@register("round_robin")
class RoundRobin:
    def __init__(self, block_size: int = 16):
        self._turn: dict[str, itertools.count] = {}

    def rank(self, role: str, loads: list[GroupLoad], prompt_ids: list[int]) -> list[str]:
        healthy = _healthy(loads)
        if not healthy:
            return []
        start = next(self._turn.setdefault(role, itertools.count())) % len(healthy)
        return [g.name for g in healthy[start:] + healthy[:start]]


@register("least_loaded")
class LeastLoaded:
    def __init__(self, block_size: int = 16):
        pass

    def rank(self, role: str, loads: list[GroupLoad], prompt_ids: list[int]) -> list[str]:
        return [g.name for g in _by_load(loads)]


@register("prefix_affinity")
class PrefixAffinity:
    #: Leading blocks hashed (a shared system prompt decides, not the question after it).
    prefix_blocks = 4
    #: Requests more than the least-loaded group's before affinity gives way to load.
    max_imbalance = 8

    def __init__(self, block_size: int = 16):
        self.block_size = block_size

    def rank(self, role: str, loads: list[GroupLoad], prompt_ids: list[int]) -> list[str]:
        by_load = _by_load(loads)
        n = min(len(prompt_ids) // self.block_size, self.prefix_blocks) * self.block_size
        if not by_load or n == 0:
            return [g.name for g in by_load]
        key = str(prompt_ids[:n]).encode()
        chosen = max(by_load, key=lambda g: hashlib.blake2b(key + g.name.encode(), digest_size=8).digest())
        busiest_ok = by_load[0].num_waiting + by_load[0].num_running + self.max_imbalance
        if chosen.num_waiting + chosen.num_running > busiest_ok:
            return [g.name for g in by_load]
        return [chosen.name] + [g.name for g in by_load if g is not chosen]
