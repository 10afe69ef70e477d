"""router/policies.py: each policy's order of the healthy groups of one role, its ties, and
that an unhealthy group or an empty list never yields a choice. Plain `GroupLoad` values:
no engine, no model."""

from __future__ import annotations

import hashlib

import pytest

from splitserve.router.policies import POLICIES, LeastLoaded, PrefixAffinity, RoundRobin, make_policy
from splitserve.workers.disagg_engine import GroupLoad

BS = 4


def load(name: str, index: int, waiting: int = 0, running: int = 0, kv: float = 0.0,
         healthy: bool = True, role: str = "decode") -> GroupLoad:
    return GroupLoad(name=name, role=role, index=index, healthy=healthy, num_waiting=waiting,
                     num_running=running, kv_usage=kv, num_free_blocks=0 if not healthy else 100)


def four() -> list[GroupLoad]:
    return [load(f"d{i}", i) for i in range(4)]


# ---- the registry ------------------------------------------------------------------------------


def test_registry_names_every_policy_and_refuses_an_unknown_one():
    assert set(POLICIES) == {"round_robin", "least_loaded", "prefix_affinity"}
    assert isinstance(make_policy("round_robin"), RoundRobin)
    assert isinstance(make_policy("least_loaded"), LeastLoaded)
    policy = make_policy("prefix_affinity", block_size=32)
    assert isinstance(policy, PrefixAffinity) and policy.block_size == 32
    with pytest.raises(ValueError, match="unknown router policy 'fastest'.*least_loaded"):
        make_policy("fastest")


@pytest.mark.parametrize("name", ["round_robin", "least_loaded", "prefix_affinity"])
def test_no_group_or_no_healthy_group_gives_no_choice(name):
    policy = make_policy(name, block_size=BS)
    prompt = list(range(40))
    assert policy.rank("decode", [], prompt) == []
    dead = [load("d0", 0, healthy=False), load("d1", 1, healthy=False)]
    assert policy.rank("decode", dead, prompt) == []


@pytest.mark.parametrize("name", ["round_robin", "least_loaded", "prefix_affinity"])
def test_an_unhealthy_group_is_never_ranked(name):
    policy = make_policy(name, block_size=BS)
    loads = [load("d0", 0, waiting=5), load("d1", 1, healthy=False), load("d2", 2, running=1)]
    for prompt in ([1, 2], list(range(40)), list(range(100, 140))):
        ranked = policy.rank("decode", loads, prompt)
        assert sorted(ranked) == ["d0", "d2"], ranked


# ---- round_robin -------------------------------------------------------------------------------


def test_round_robin_turns_through_the_groups_whatever_their_load():
    policy = RoundRobin()
    loads = [load("d0", 0, waiting=50), load("d1", 1), load("d2", 2, kv=0.99)]
    got = [policy.rank("decode", loads, [1])[0] for _ in range(7)]
    assert got == ["d0", "d1", "d2", "d0", "d1", "d2", "d0"]
    # The whole order rotates: the rest follow in index order after the chosen one.
    assert policy.rank("decode", loads, [1]) == ["d1", "d2", "d0"]


def test_round_robin_keeps_one_turn_per_role():
    policy = RoundRobin()
    prefill = [load("p0", 0, role="prefill"), load("p1", 1, role="prefill")]
    decode = [load("d0", 0), load("d1", 1), load("d2", 2)]
    assert policy.rank("prefill", prefill, [1])[0] == "p0"
    assert policy.rank("decode", decode, [1])[0] == "d0"
    assert policy.rank("prefill", prefill, [1])[0] == "p1"
    assert policy.rank("decode", decode, [1])[0] == "d1"


def test_round_robin_skips_an_unhealthy_group_and_an_empty_turn_costs_nothing():
    policy = RoundRobin()
    loads = [load("d0", 0), load("d1", 1, healthy=False), load("d2", 2)]
    assert [policy.rank("decode", loads, [1]) for _ in range(3)] == [["d0", "d2"], ["d2", "d0"], ["d0", "d2"]]
    policy = RoundRobin()
    assert policy.rank("decode", [load("d0", 0, healthy=False)], [1]) == []
    assert policy.rank("decode", four(), [1])[0] == "d0"  # the empty call did not use a turn


# ---- least_loaded ------------------------------------------------------------------------------


def test_least_loaded_orders_by_requests_then_kv_usage_then_index():
    loads = [
        load("a", 0, waiting=2, running=1),      # 3 requests
        load("b", 1, running=1, kv=0.9),         # 1 request, fuller cache
        load("c", 2, waiting=1, kv=0.1),         # 1 request, emptier cache
        load("d", 3),                            # idle
        load("e", 4, running=1, kv=0.1),         # ties with c: the lower index first
    ]
    assert LeastLoaded().rank("decode", loads, [1, 2, 3]) == ["d", "c", "e", "b", "a"]


def test_least_loaded_counts_waiting_and_running_alike():
    loads = [load("a", 0, waiting=3), load("b", 1, running=2), load("c", 2, waiting=1, running=1, kv=0.5)]
    assert LeastLoaded().rank("prefill", loads, []) == ["b", "c", "a"]


def test_least_loaded_full_tie_keeps_index_order_whatever_the_input_order():
    loads = [load("x", 2), load("y", 0), load("z", 1)]
    assert LeastLoaded().rank("decode", loads, [1]) == ["y", "z", "x"]


# ---- prefix_affinity ---------------------------------------------------------------------------


def _rendezvous(prefix: list[int], names: list[str]) -> str:
    """The group rendezvous hashing picks for ``prefix``: the highest hash of (prefix, name)."""
    key = str(prefix).encode()
    return max(names, key=lambda n: hashlib.blake2b(key + n.encode(), digest_size=8).digest())


def test_prefix_affinity_picks_the_rendezvous_winner_then_the_rest_by_load():
    policy = PrefixAffinity(block_size=BS)
    loads = [load("d0", 0, running=2), load("d1", 1), load("d2", 2, running=1), load("d3", 3, kv=0.5)]
    prompt = list(range(10, 30))  # 5 blocks: the first 4 decide
    chosen = _rendezvous(prompt[:4 * BS], ["d0", "d1", "d2", "d3"])
    by_load = ["d1", "d3", "d2", "d0"]
    assert policy.rank("decode", loads, prompt) == [chosen] + [n for n in by_load if n != chosen]


def test_prefix_affinity_same_leading_blocks_same_group():
    policy = PrefixAffinity(block_size=BS)
    system = list(range(100, 100 + 4 * BS))
    first = {policy.rank("decode", four(), system + tail)[0] for tail in ([1], [2, 3, 4], list(range(50)))}
    assert len(first) == 1
    # Input order and load (within the imbalance margin) do not move it.
    shuffled = [load("d3", 3, running=3), load("d1", 1), load("d0", 0, waiting=2), load("d2", 2)]
    assert policy.rank("decode", shuffled, system + [7])[0] == first.pop()


def test_prefix_affinity_hashes_only_whole_blocks():
    policy = PrefixAffinity(block_size=BS)
    names = ["d0", "d1", "d2", "d3"]
    # 7 tokens: one whole block decides; the partial second block does not.
    for prompt in ([5, 6, 7, 8, 1, 2, 3], [5, 6, 7, 8, 9, 9, 9]):
        assert policy.rank("decode", four(), prompt)[0] == _rendezvous([5, 6, 7, 8], names)


def test_prefix_affinity_spreads_prefixes_and_losing_a_group_moves_only_its_own():
    policy = PrefixAffinity(block_size=BS)
    prompts = [list(range(i, i + 2 * BS)) for i in range(0, 400, 7)]
    before = {tuple(p): policy.rank("decode", four(), p)[0] for p in prompts}
    assert set(before.values()) == {"d0", "d1", "d2", "d3"}
    without_d2 = [g if g.name != "d2" else load("d2", 2, healthy=False) for g in four()]
    after = {tuple(p): policy.rank("decode", without_d2, p)[0] for p in prompts}
    for p, group in before.items():
        if group == "d2":
            assert after[p] != "d2"
        else:
            assert after[p] == group


def test_prefix_affinity_short_prompt_falls_back_to_least_loaded():
    policy = PrefixAffinity(block_size=BS)
    loads = [load("d0", 0, running=2), load("d1", 1, running=1), load("d2", 2)]
    assert policy.rank("decode", loads, [1, 2, 3]) == ["d2", "d1", "d0"]
    assert policy.rank("decode", loads, []) == ["d2", "d1", "d0"]


def test_prefix_affinity_gives_way_when_the_chosen_group_is_too_busy():
    policy = PrefixAffinity(block_size=BS)
    prompt = list(range(60, 60 + 4 * BS))
    chosen = _rendezvous(prompt, ["d0", "d1"])
    other = "d1" if chosen == "d0" else "d0"
    idx = {"d0": 0, "d1": 1}

    def loads(busy: int) -> list[GroupLoad]:
        return [load(chosen, idx[chosen], running=busy), load(other, idx[other], running=1)]

    # Up to max_imbalance (8) requests more than the least-loaded group: affinity wins.
    assert policy.rank("decode", loads(1 + PrefixAffinity.max_imbalance), prompt) == [chosen, other]
    # One more: plain least-loaded order.
    assert policy.rank("decode", loads(2 + PrefixAffinity.max_imbalance), prompt) == [other, chosen]
