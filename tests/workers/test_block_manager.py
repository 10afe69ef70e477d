"""Block manager (workers/block_manager.py): allocation, ref counts, prefix caching, LRU.

Every scenario ends with the leak check of docs/design.md invariant 2: once every sequence is
freed, all blocks are free again (cached ones count as free) and no reference remains.
"""

import pytest

from splitserve.workers.block_manager import BlockManager, CachedPrefix, hash_block
from splitserve.workers.cache_salt import MAX_CACHE_SALT_CHARS, check_cache_salt, salt_key
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.sequence import Sequence

BS = 4


# ---- helpers -----------------------------------------------------------------------------


def make_seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams())


def tokens(start, n):
    """n distinct token ids from ``start`` (different starts give different blocks)."""
    return list(range(start, start + n))


def take(bm, seq, num_new, prefix=CachedPrefix(())):
    """`allocate`, and record what it gave on ``seq`` as its owner (the scheduler) does."""
    got = bm.allocate(seq, num_new, prefix)
    seq.block_ids.extend(got.block_ids)
    if got.hit_block_ids:
        seq.num_computed_tokens += got.num_hit_tokens
        seq.num_registered_blocks = len(got.hit_block_ids)
    return got


def give_back(bm, seq):
    """`free` the sequence's blocks and clear its block table, as the scheduler does."""
    bm.free(seq.block_ids)
    seq.block_ids = []
    seq.num_registered_blocks = 0


def cache(bm, seq):
    seq.num_registered_blocks = bm.cache_full_blocks(seq)


def admit(bm, seq, computed=True):
    """Look up the prefix, allocate the rest, and (optionally) mark it all computed + cached."""
    prefix = bm.find_cached_prefix(seq)
    num_new = seq.num_tokens - prefix.num_blocks * bm.block_size
    assert bm.can_allocate(seq, num_new, prefix)
    take(bm, seq, num_new, prefix)
    if computed:
        seq.num_computed_tokens = seq.num_tokens
        cache(bm, seq)
    return prefix


def assert_no_leak(bm):
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert bm.usage == 0.0


def hit_ids(bm, toks):
    return bm.find_cached_prefix(make_seq(toks, "probe")).block_ids


# ---- allocation --------------------------------------------------------------------------


@pytest.mark.parametrize("n,blocks", [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_needed_rounds_up(n, blocks):
    assert BlockManager(8, BS).blocks_needed(n) == blocks


def test_allocate_takes_distinct_blocks_and_free_returns_them():
    bm = BlockManager(8, BS)
    seq = make_seq(tokens(0, 9))
    admit(bm, seq, computed=False)
    assert len(seq.block_ids) == 3 == len(set(seq.block_ids))
    assert bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_ids)
    assert bm.usage == pytest.approx(3 / 8)
    give_back(bm, seq)
    assert seq.block_ids == []
    assert_no_leak(bm)


def test_decode_growth_adds_a_block_only_when_the_last_one_is_full():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    seq = make_seq(tokens(0, 6))
    admit(bm, seq)
    for step, owned in enumerate([2, 2, 3, 3, 3, 3, 4]):  # after computing tokens 7..13
        seq.output_token_ids.append(100 + step)
        assert bm.can_allocate(seq, 1)
        take(bm, seq, 1)
        seq.num_computed_tokens += 1
        assert len(seq.block_ids) == owned == bm.blocks_needed(seq.num_tokens)
    assert bm.num_free_blocks == 8 - 4
    give_back(bm, seq)
    assert_no_leak(bm)


def test_allocate_without_room_raises_and_changes_nothing():
    bm = BlockManager(2, BS)
    seq = make_seq(tokens(0, 9))
    assert not bm.can_allocate(seq, 9)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        take(bm, seq, 9)
    assert seq.block_ids == [] and seq.num_computed_tokens == 0
    assert_no_leak(bm)


# ---- prefix caching ----------------------------------------------------------------------


def test_shared_cached_prefix_is_reference_counted():
    bm = BlockManager(10, BS)
    a = make_seq(tokens(0, 13), "a")
    admit(bm, a)
    b = make_seq(tokens(0, 12) + [99, 98], "b")
    prefix = admit(bm, b, computed=False)
    assert prefix.block_ids == tuple(a.block_ids[:3])
    assert b.block_ids[:3] == a.block_ids[:3]
    assert b.num_computed_tokens == 12 and b.num_registered_blocks == 3
    assert len(b.block_ids) == 4 and b.block_ids[3] not in a.block_ids
    assert [bm.blocks[i].ref_count for i in a.block_ids] == [2, 2, 2, 1]
    assert bm.num_free_blocks == 10 - 5

    give_back(bm, a)
    assert [bm.blocks[i].ref_count for i in b.block_ids] == [1, 1, 1, 1]
    assert bm.num_free_blocks == 10 - 4  # only a's tail came back
    give_back(bm, b)
    assert_no_leak(bm)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_prefix_hit_never_covers_the_last_token(k):
    bm = BlockManager(10, BS)
    prompt = tokens(0, k * BS)
    a = make_seq(prompt, "a")
    admit(bm, a)
    assert len(hit_ids(bm, prompt + [77])) == k  # one more token: every full block hits

    b = make_seq(prompt, "b")
    prefix = bm.find_cached_prefix(b)
    assert prefix.num_blocks == k - 1
    assert bm.can_allocate(b, BS, prefix)
    take(bm, b, BS, prefix)
    assert b.num_computed_tokens == (k - 1) * BS  # the last block is recomputed
    assert b.num_uncomputed_tokens == BS
    give_back(bm, a), give_back(bm, b)
    assert_no_leak(bm)


def test_hash_chain_depends_on_the_whole_prefix():
    block = tokens(10, BS)
    h0 = hash_block(None, tokens(0, BS))
    assert hash_block(h0, block) == hash_block(h0, list(block))
    assert hash_block(h0, block) != hash_block(None, block)
    assert hash_block(h0, block) != hash_block(hash_block(None, tokens(50, BS)), block)
    assert hash_block(h0, block) != hash_block(h0, block[::-1])

    bm = BlockManager(10, BS)
    a = make_seq(tokens(0, BS) + block + [1], "a")
    admit(bm, a)
    assert len(hit_ids(bm, tokens(0, BS) + block + [2])) == 2
    # The same block tokens under a different (or no) prefix do not hit a's second block.
    assert hit_ids(bm, block + [1]) == ()
    assert hit_ids(bm, tokens(50, BS) + block + [1]) == ()
    give_back(bm, a)
    assert_no_leak(bm)


def test_prefix_includes_output_tokens():
    """Blocks that straddle prompt and output are cached by their full content."""
    bm = BlockManager(10, BS)
    a = make_seq(tokens(0, 6), "a")
    admit(bm, a)
    for t in (200, 201, 202):
        a.output_token_ids.append(t)
        take(bm, a, 1)
        a.num_computed_tokens += 1
        cache(bm, a)
    assert a.num_tokens == 9 and a.num_computed_tokens == 9
    assert hit_ids(bm, tokens(0, 6) + [200, 201, 5]) == tuple(a.block_ids[:2])
    assert hit_ids(bm, tokens(0, 6) + [200, 999, 5]) == tuple(a.block_ids[:1])
    give_back(bm, a)
    assert_no_leak(bm)


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(tokens(0, 9), "a")
    admit(bm, a)
    assert all(bm.blocks[i].block_hash is None for i in a.block_ids)
    assert hit_ids(bm, tokens(0, 9)) == ()
    give_back(bm, a)
    assert hit_ids(bm, tokens(0, 9)) == ()
    assert_no_leak(bm)


def test_cache_full_blocks_registers_only_computed_full_blocks():
    bm = BlockManager(8, BS)
    a = make_seq(tokens(0, 10), "a")
    admit(bm, a, computed=False)  # blocks for all 10 tokens, none computed yet
    cache(bm, a)
    assert [bm.blocks[i].block_hash for i in a.block_ids] == [None, None, None]
    assert hit_ids(bm, tokens(0, 10)) == ()

    a.num_computed_tokens = 6  # first chunk: one full block and half of the second
    cache(bm, a)
    assert a.num_registered_blocks == 1
    assert [bm.blocks[i].block_hash is not None for i in a.block_ids] == [True, False, False]
    assert hit_ids(bm, tokens(0, 10)) == tuple(a.block_ids[:1])

    a.num_computed_tokens = 10  # second chunk: block 2 is full, block 3 holds 2 tokens
    cache(bm, a)
    assert a.num_registered_blocks == 2
    assert [bm.blocks[i].block_hash is not None for i in a.block_ids] == [True, True, False]
    assert hit_ids(bm, tokens(0, 12) + [5]) == tuple(a.block_ids[:2])  # never the partial one
    give_back(bm, a)
    assert_no_leak(bm)


def test_duplicate_content_is_registered_once():
    """Two identical prompts computed side by side: the second copy is not registered."""
    bm = BlockManager(8, BS)
    a, b = make_seq(tokens(0, 5), "a"), make_seq(tokens(0, 5), "b")
    for s in (a, b):
        take(bm, s, 5)
    for s in (a, b):
        s.num_computed_tokens = 5
        cache(bm, s)
    assert bm.blocks[a.block_ids[0]].block_hash is not None
    assert bm.blocks[b.block_ids[0]].block_hash is None
    assert hit_ids(bm, tokens(0, 5)) == (a.block_ids[0],)
    give_back(bm, a), give_back(bm, b)
    assert_no_leak(bm)


def test_reset_prefix_cache_forgets_every_block():
    bm = BlockManager(8, BS)
    a = make_seq(tokens(0, 9), "a")
    admit(bm, a)
    give_back(bm, a)
    bm.reset_prefix_cache()
    assert hit_ids(bm, tokens(0, 9)) == ()
    assert all(b.block_hash is None for b in bm.blocks)
    assert_no_leak(bm)


# ---- LRU eviction ------------------------------------------------------------------------


def _two_cached_and_freed() -> tuple[BlockManager, list[int], list[int]]:
    """A full 4-block cache holding two freed, cached two-block prompts: a freed before b."""
    bm = BlockManager(4, BS)
    a, b = make_seq(tokens(0, 8), "a"), make_seq(tokens(100, 8), "b")
    admit(bm, a), admit(bm, b)
    a_ids, b_ids = list(a.block_ids), list(b.block_ids)
    give_back(bm, a), give_back(bm, b)
    return bm, a_ids, b_ids


def test_lru_evicts_least_recently_freed_and_tail_before_head():
    bm, a_ids, b_ids = _two_cached_and_freed()
    assert bm.num_free_blocks == 4
    assert len(hit_ids(bm, tokens(0, 8) + [1])) == 2 and len(hit_ids(bm, tokens(100, 8) + [1])) == 2

    expected = [a_ids[1], a_ids[0], b_ids[1], b_ids[0]]  # a before b; each tail before head
    cs = []
    for i, want in enumerate(expected):
        c = make_seq(tokens(1000 + 10 * i, 3), f"c{i}")
        admit(bm, c, computed=False)
        cs.append(c)
        assert bm.blocks[want].block_hash is None  # the evicted block loses its cache entry
    assert [c.block_ids[0] for c in cs] == expected
    assert hit_ids(bm, tokens(0, 8) + [1]) == ()
    assert hit_ids(bm, tokens(100, 8) + [1]) == ()
    for c in cs:
        give_back(bm, c)
    assert_no_leak(bm)


def test_evicted_tail_leaves_head_hit_only():
    bm, a_ids, _ = _two_cached_and_freed()
    c = make_seq(tokens(1000, 3), "c")
    admit(bm, c, computed=False)
    assert c.block_ids == [a_ids[1]]
    assert hit_ids(bm, tokens(0, 8) + [1]) == (a_ids[0],)
    assert len(hit_ids(bm, tokens(100, 8) + [1])) == 2
    give_back(bm, c)
    assert_no_leak(bm)


def test_reusing_a_cached_block_makes_it_most_recently_used():
    bm, a_ids, b_ids = _two_cached_and_freed()
    a2 = make_seq(tokens(0, 8) + [7], "a2")  # hits both of a's blocks, takes them off the queue
    prefix = bm.find_cached_prefix(a2)
    take(bm, a2, 0, prefix)
    assert a2.block_ids == a_ids
    give_back(bm, a2)  # a's blocks are now the most recently freed
    c = make_seq(tokens(1000, 8), "c")
    admit(bm, c, computed=False)
    assert c.block_ids == [b_ids[1], b_ids[0]]
    assert hit_ids(bm, tokens(0, 8) + [1]) == tuple(a_ids)
    give_back(bm, c)
    assert_no_leak(bm)


# ---- can_allocate with hits --------------------------------------------------------------


def test_can_allocate_counts_hits_that_sit_in_the_free_queue():
    bm = BlockManager(4, BS)
    a = make_seq(tokens(0, 8), "a")
    admit(bm, a)
    give_back(bm, a)  # 4 free blocks, 2 of them a's cached blocks

    fits = make_seq(tokens(0, 16), "fits")  # 2 hits + 2 new = 4 blocks
    prefix = bm.find_cached_prefix(fits)
    assert prefix.num_blocks == 2
    assert bm.can_allocate(fits, 8, prefix)

    too_big = make_seq(tokens(0, 17), "too_big")  # 2 hits + 3 new = 5 blocks > 4
    prefix = bm.find_cached_prefix(too_big)
    assert prefix.num_blocks == 2
    assert not bm.can_allocate(too_big, 9, prefix)
    with pytest.raises(RuntimeError):
        take(bm, too_big, 9, prefix)
    assert too_big.block_ids == [] and too_big.num_computed_tokens == 0
    assert_no_leak(bm)
    assert len(hit_ids(bm, tokens(0, 8) + [1])) == 2  # the failed allocate evicted nothing


def test_can_allocate_does_not_count_hits_held_by_a_running_sequence():
    bm = BlockManager(4, BS)
    a = make_seq(tokens(0, 8), "a")
    admit(bm, a)  # a keeps running: its blocks are referenced, 2 free blocks remain
    b = make_seq(tokens(0, 16), "b")  # 2 hits (already referenced) + 2 new = exactly the free 2
    prefix = bm.find_cached_prefix(b)
    assert bm.can_allocate(b, 8, prefix)
    take(bm, b, 8, prefix)
    assert bm.num_free_blocks == 0
    assert [bm.blocks[i].ref_count for i in b.block_ids] == [2, 2, 1, 1]
    give_back(bm, a), give_back(bm, b)
    assert_no_leak(bm)


def test_cached_prefix_value_object():
    assert CachedPrefix(()).num_blocks == 0
    assert CachedPrefix((3, 1)).num_blocks == 2


# ---- leak check over a mixed scenario ----------------------------------------------------


def test_every_block_returns_after_a_mixed_scenario():
    bm = BlockManager(12, BS)
    seqs = []
    for i, toks in enumerate([tokens(0, 9), tokens(0, 13), tokens(0, 4) + [5, 6], tokens(50, 3)]):
        s = make_seq(toks, f"s{i}")
        admit(bm, s)
        seqs.append(s)
    for s in seqs[:2]:  # a few decode steps for two of them
        for t in range(5):
            s.output_token_ids.append(300 + t)
            take(bm, s, 1)
            s.num_computed_tokens += 1
            cache(bm, s)
    assert bm.num_free_blocks < bm.num_blocks
    for s in seqs[::-1]:
        give_back(bm, s)
    assert_no_leak(bm)
    late = make_seq(tokens(0, 9), "late")  # the cache still serves after everything was freed
    assert admit(bm, late).num_blocks == 2
    give_back(bm, late)
    assert_no_leak(bm)


def test_prefix_stats_count_each_admission_once():
    bm = BlockManager(16, 4)
    first = Sequence("a", list(range(9)), SamplingParams())
    take(bm, first, 9)
    first.num_computed_tokens = 9
    cache(bm, first)
    second = Sequence("b", list(range(9)), SamplingParams())
    for _ in range(3):  # looked up while waiting: not counted
        prefix = bm.find_cached_prefix(second)
    take(bm, second, 1, prefix)
    assert (bm.num_prefix_queries, bm.num_prefix_hits) == (18, 8)
    give_back(bm, first)
    give_back(bm, second)


# ---- cache salts ---------------------------------------------------------------------------


def salted(toks, salt, rid="s"):
    return Sequence(rid, list(toks), SamplingParams(), cache_salt=salt)


def test_different_salts_never_share_blocks():
    bm = BlockManager(32, BS)
    owner = salted(tokens(0, 13), "tenant-a", "a")
    admit(bm, owner)
    give_back(bm, owner)
    for probe_salt in ("tenant-b", None):
        probe = salted(tokens(0, 13), probe_salt, "probe")
        assert bm.find_cached_prefix(probe).num_blocks == 0, probe_salt
    assert bm.find_cached_prefix(salted(tokens(0, 13), "tenant-a", "again")).num_blocks == 3
    assert_no_leak(bm)


def test_unsalted_blocks_are_not_found_by_a_salted_sequence():
    bm = BlockManager(32, BS)
    plain = make_seq(tokens(0, 9), "plain")
    admit(bm, plain)
    give_back(bm, plain)
    assert bm.find_cached_prefix(salted(tokens(0, 9), "x")).num_blocks == 0
    assert bm.find_cached_prefix(make_seq(tokens(0, 9), "again")).num_blocks == 2
    assert_no_leak(bm)


def test_salts_key_the_first_block_and_the_chain_carries_them():
    a, b, none = salted(tokens(0, 12), "a"), salted(tokens(0, 12), "b"), make_seq(tokens(0, 12))
    bm = BlockManager(8, BS)
    for seq in (a, b, none):
        for i in range(3):
            bm._block_hash(seq, i)
    for i in range(3):  # every block of the chain differs, not only the first
        assert len({a.block_hashes[i], b.block_hashes[i], none.block_hashes[i]}) == 3
    # Unsalted hashes are as before the salts existed (a cache shared by old and new code agrees).
    assert none.block_hashes[0] == hash_block(None, tokens(0, BS))
    assert a.block_hashes[0] == hash_block(None, tokens(0, BS), salt_key("a"))


@pytest.mark.parametrize("salt, ok", [(None, True), ("s", True), ("x" * MAX_CACHE_SALT_CHARS, True),
                                      ("", False), ("x" * (MAX_CACHE_SALT_CHARS + 1), False), (b"s", False)])
def test_cache_salt_check(salt, ok):
    if ok:
        check_cache_salt(salt)
    else:
        with pytest.raises(ValueError, match="cache_salt"):
            check_cache_salt(salt)


def test_allocate_returns_what_it_gave_and_writes_nothing_into_the_sequence():
    """The scheduler records blocks and progress (scheduler.py): `allocate` only reports
    the prefix hits (their tokens) and the fresh blocks, in block-table order."""
    bm = BlockManager(8, BS)
    a = make_seq(tokens(0, 9), "a")
    admit(bm, a)
    b = make_seq(tokens(0, 9), "b")
    prefix = bm.find_cached_prefix(b)
    got = bm.allocate(b, 1, prefix)
    assert got.hit_block_ids == tuple(a.block_ids[:2]) and got.num_hit_tokens == 2 * BS
    assert len(got.new_block_ids) == 1 and got.new_block_ids[0] not in a.block_ids
    assert got.block_ids == got.hit_block_ids + got.new_block_ids
    assert b.block_ids == [] and b.num_computed_tokens == 0 and b.num_registered_blocks == 0
    bm.free(list(got.block_ids))
    give_back(bm, a)
    assert_no_leak(bm)


def test_cache_full_blocks_returns_the_count_for_the_owner_to_record():
    bm = BlockManager(8, BS)
    s = make_seq(tokens(100, 10), "s")
    take(bm, s, 10)
    s.num_computed_tokens = 9
    assert bm.cache_full_blocks(s) == 2 and s.num_registered_blocks == 0
    give_back(bm, s)
    assert_no_leak(bm)
