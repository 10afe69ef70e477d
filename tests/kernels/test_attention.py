"""Paged attention references (kernels/attention.py) against a naive per-row oracle.

The oracle gathers each sequence's K/V token by token through its block table with Python
loops, then runs an explicit softmax per query over the keys it may see: key j is visible
to query i iff j <= i and (no window, or i - j < window). Block tables are shuffled,
non-contiguous block ids, so a wrong slot formula or a wrong gather order shows up.
"""

import math

import pytest
import torch

from splitserve.kernels.attention import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    write_kv_ref,
)

D = 8
NUM_BLOCKS = 24
ATOL = 1e-5

HEADS = pytest.mark.parametrize("hq,hk", [(4, 2), (2, 2)], ids=["gqa", "mha"])
BLOCK_SIZES = pytest.mark.parametrize("bs", [4, 16])


# ---- helpers -----------------------------------------------------------------------------


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_cache(bs, hk, seed=0):
    """K and V caches [NUM_BLOCKS, bs, hk, D] filled with noise (unwritten slots included)."""
    g = gen(seed)
    return (torch.randn(NUM_BLOCKS, bs, hk, D, generator=g),
            torch.randn(NUM_BLOCKS, bs, hk, D, generator=g))


def random_tables(lens, bs, seed=0):
    """One block table per row: shuffled, disjoint block ids (never 0..n in order)."""
    perm = torch.randperm(NUM_BLOCKS, generator=gen(seed + 100)).tolist()
    tables = []
    for n in lens:
        need = -(-n // bs)
        tables.append(perm[:need])
        perm = perm[need:]
    return tables


def padded(tables, pad_ids):
    """[B, M] tensor; short rows padded with ids of *other* blocks full of noise."""
    width = max(len(t) for t in tables)
    rows = [t + pad_ids[: width - len(t)] for t in tables]
    return torch.tensor(rows, dtype=torch.int64)


def gather_row(cache, table, length, bs):
    """Contiguous [length, Hk, D] context of one sequence, one token at a time."""
    return torch.stack([cache[table[t // bs], t % bs] for t in range(length)])


def naive_attention(q, k, v, q_positions, scale, window=None):
    """q [Tq, Hq, D] at absolute q_positions; k, v [L, Hk, D] contiguous -> [Tq, Hq, D]."""
    hq, hk = q.shape[1], k.shape[1]
    group = hq // hk
    out = torch.zeros_like(q)
    for qi, i in enumerate(q_positions):
        visible = [j for j in range(k.shape[0]) if j <= i and (window is None or i - j < window)]
        for h in range(hq):
            kv_h = h // group
            scores = torch.stack([(q[qi, h] * k[j, kv_h]).sum() * scale for j in visible])
            weights = torch.exp(scores - scores.max())
            weights = weights / weights.sum()
            out[qi, h] = sum(w * v[j, kv_h] for w, j in zip(weights, visible))
    return out


def write_sequence(k_cache, v_cache, table, k, v, bs, start=0):
    """Write tokens start.. of one sequence through write_kv_ref."""
    slots = torch.tensor([table[t // bs] * bs + t % bs for t in range(start, start + k.shape[0])])
    write_kv_ref(k_cache, v_cache, k, v, slots)


# ---- write_kv_ref ------------------------------------------------------------------------


@BLOCK_SIZES
def test_write_kv_puts_each_token_at_block_times_bs_plus_offset(bs):
    hk = 2
    k_cache, v_cache = torch.zeros(NUM_BLOCKS, bs, hk, D), torch.zeros(NUM_BLOCKS, bs, hk, D)
    n = 2 * bs + 3
    (table,) = random_tables([n], bs, seed=1)
    g = gen(2)
    k, v = torch.randn(n, hk, D, generator=g), torch.randn(n, hk, D, generator=g)
    slots = torch.tensor([table[t // bs] * bs + t % bs for t in range(n)])
    write_kv_ref(k_cache, v_cache, k, v, slots)
    for t in range(n):
        assert torch.equal(k_cache[table[t // bs], t % bs], k[t])
        assert torch.equal(v_cache[table[t // bs], t % bs], v[t])
    written = torch.zeros(NUM_BLOCKS * bs, dtype=torch.bool)
    written[slots] = True
    assert k_cache.view(-1, hk, D)[~written].abs().sum() == 0
    assert v_cache.view(-1, hk, D)[~written].abs().sum() == 0


# ---- decode ------------------------------------------------------------------------------


@HEADS
@BLOCK_SIZES
@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
def test_decode_matches_naive_rows_of_different_lengths(hq, hk, bs, window):
    lens = [1, bs + 1, 2 * bs + 3, bs]
    k_cache, v_cache = random_cache(bs, hk, seed=3)
    tables = random_tables(lens, bs, seed=4)
    used = {b for t in tables for b in t}
    pad_ids = [b for b in range(NUM_BLOCKS) if b not in used]
    q = torch.randn(len(lens), hq, D, generator=gen(5))
    scale = 1 / math.sqrt(D)

    out = paged_decode_attention_ref(
        q, k_cache, v_cache, padded(tables, pad_ids), torch.tensor(lens), scale, window)

    assert out.shape == (len(lens), hq, D)
    for b, (n, table) in enumerate(zip(lens, tables)):
        k = gather_row(k_cache, table, n, bs)
        v = gather_row(v_cache, table, n, bs)
        want = naive_attention(q[b : b + 1], k, v, [n - 1], scale, window)
        torch.testing.assert_close(out[b : b + 1], want, atol=ATOL, rtol=0)


def test_decode_ignores_padding_and_other_rows_blocks():
    """Changing the noise in padding blocks or another row's blocks leaves a row unchanged."""
    bs, hk, hq = 4, 2, 4
    lens = [3, 9]
    k_cache, v_cache = random_cache(bs, hk, seed=6)
    tables = random_tables(lens, bs, seed=7)
    pad = [b for b in range(NUM_BLOCKS) if b not in tables[0] + tables[1]]
    bt = padded(tables, pad)
    q = torch.randn(2, hq, D, generator=gen(8))
    before = paged_decode_attention_ref(q, k_cache, v_cache, bt, torch.tensor(lens), 0.5)
    k2, v2 = k_cache.clone(), v_cache.clone()
    for b in pad:
        k2[b].normal_(generator=gen(9))
        v2[b].normal_(generator=gen(10))
    k2[tables[0][0], 3:] = 1e3  # slot past row 0's context inside its own block
    after = paged_decode_attention_ref(q, k2, v2, bt, torch.tensor(lens), 0.5)
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)


# ---- prefill -----------------------------------------------------------------------------


def _prefill_case(hq, hk, bs, prefix_len, chunk_len, seed):
    k_cache, v_cache = random_cache(bs, hk, seed=seed)
    n = prefix_len + chunk_len
    (table,) = random_tables([n + bs], bs, seed=seed + 1)  # one spare block in the table
    g = gen(seed + 2)
    k_all, v_all = torch.randn(n, hk, D, generator=g), torch.randn(n, hk, D, generator=g)
    q = torch.randn(chunk_len, hq, D, generator=g)
    write_sequence(k_cache, v_cache, table, k_all, v_all, bs)
    return k_cache, v_cache, torch.tensor(table), k_all, v_all, q


@HEADS
@BLOCK_SIZES
@pytest.mark.parametrize("use_new", [False, True], ids=["from_cache", "k_new"])
def test_prefill_without_prefix_matches_naive(hq, hk, bs, use_new):
    n = bs + 3
    k_cache, v_cache, table, k_all, v_all, q = _prefill_case(hq, hk, bs, 0, n, seed=11)
    scale = 0.3
    kw = {"k_new": k_all, "v_new": v_all} if use_new else {}
    out = paged_prefill_attention_ref(q, k_cache, v_cache, table, n, scale, **kw)
    want = naive_attention(q, k_all, v_all, list(range(n)), scale)
    assert out.shape == (n, hq, D)
    torch.testing.assert_close(out, want, atol=ATOL, rtol=0)


def test_prefill_k_new_is_what_is_read_without_prefix():
    """With no prefix, k_new/v_new are the keys: a stale cache must not leak in."""
    bs, hq, hk, n = 4, 4, 2, 7
    k_cache, v_cache, table, k_all, v_all, q = _prefill_case(hq, hk, bs, 0, n, seed=12)
    k_cache.zero_(), v_cache.zero_()
    out = paged_prefill_attention_ref(q, k_cache, v_cache, table, n, 0.3, k_new=k_all, v_new=v_all)
    torch.testing.assert_close(
        out, naive_attention(q, k_all, v_all, list(range(n)), 0.3), atol=ATOL, rtol=0)


@HEADS
@BLOCK_SIZES
@pytest.mark.parametrize("prefix_len", [1, 5, 16])
def test_prefill_chunk_over_cached_prefix_matches_naive(hq, hk, bs, prefix_len):
    chunk = 6
    k_cache, v_cache, table, k_all, v_all, q = _prefill_case(hq, hk, bs, prefix_len, chunk, 13)
    n = prefix_len + chunk
    scale = 1 / math.sqrt(D)
    out = paged_prefill_attention_ref(q, k_cache, v_cache, table, n, scale)
    want = naive_attention(q, k_all, v_all, list(range(prefix_len, n)), scale)
    torch.testing.assert_close(out, want, atol=ATOL, rtol=0)


@HEADS
@BLOCK_SIZES
@pytest.mark.parametrize(
    "prefix_len,use_new", [(0, False), (0, True), (7, False)], ids=["no_prefix", "k_new", "prefix"])
@pytest.mark.parametrize("window", [1, 4])
def test_prefill_sliding_window_matches_naive(hq, hk, bs, prefix_len, use_new, window):
    chunk = 9
    k_cache, v_cache, table, k_all, v_all, q = _prefill_case(hq, hk, bs, prefix_len, chunk, 14)
    n = prefix_len + chunk
    kw = {"k_new": k_all, "v_new": v_all} if use_new else {}
    out = paged_prefill_attention_ref(q, k_cache, v_cache, table, n, 0.4, window, **kw)
    want = naive_attention(q, k_all, v_all, list(range(prefix_len, n)), 0.4, window)
    torch.testing.assert_close(out, want, atol=ATOL, rtol=0)


def test_prefill_then_decode_agree_with_one_long_prefill():
    """Chunked prefill + a decode step over the same cache equal one whole-prompt prefill."""
    bs, hq, hk, n = 4, 4, 2, 11
    k_cache, v_cache, table, k_all, v_all, q_all = _prefill_case(hq, hk, bs, 0, n, seed=15)
    whole = paged_prefill_attention_ref(q_all, k_cache, v_cache, table, n, 0.3)
    first = paged_prefill_attention_ref(q_all[:5], k_cache, v_cache, table, 5, 0.3)
    second = paged_prefill_attention_ref(q_all[5:10], k_cache, v_cache, table, 10, 0.3)
    last = paged_decode_attention_ref(
        q_all[10:], k_cache, v_cache, table.unsqueeze(0), torch.tensor([n]), 0.3)
    torch.testing.assert_close(torch.cat([first, second, last]), whole, atol=ATOL, rtol=0)
