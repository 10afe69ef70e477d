"""Paged attention in Triton (kernels/attention_triton.py) against the references, on CPU in
Triton's interpreter (`triton_interpreter`), at tiny shapes.

Caches are full of noise (unwritten slots included), block tables are shuffled and padded
with other blocks' ids, and the output is poisoned (NaN) before each call, so a wrong slot
formula, a read past a context or an unwritten row all show. Decode runs with small loop
tiles (`DecodeConfig(block_n=8)`) so that several context splits really happen and the merge
kernel runs; prefill runs ragged batches mixing chunks with and without cached prefixes.
"""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.kernels.attention import paged_decode_attention_ref, paged_prefill_attention_ref, write_kv_ref

pytestmark = pytest.mark.usefixtures("triton_interpreter")

D = 16
NUM_BLOCKS = 40
HEADS = pytest.mark.parametrize("hq,hk", [(4, 1), (4, 2), (2, 2)], ids=["gqa4", "gqa2", "mha"])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def noise_cache(bs: int, hk: int, seed: int, dtype=torch.float32):
    g = gen(seed)
    return (torch.randn(NUM_BLOCKS, bs, hk, D, generator=g).to(dtype),
            torch.randn(NUM_BLOCKS, bs, hk, D, generator=g).to(dtype))


def tables_for(lens: list[int], bs: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Disjoint shuffled block ids per sequence, and the ids no sequence uses (padding)."""
    perm = torch.randperm(NUM_BLOCKS, generator=gen(seed)).tolist()
    tables = []
    for n in lens:
        need = -(-n // bs)
        tables.append(perm[:need])
        perm = perm[need:]
    return tables, perm


def padded(tables: list[list[int]], pad_ids: list[int], width: int | None = None) -> torch.Tensor:
    width = width or max(len(t) for t in tables)
    return torch.tensor([t + pad_ids[: width - len(t)] for t in tables], dtype=torch.int64)


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


# ---- decode ------------------------------------------------------------------------------


def _decode(hq, hk, bs, lens, window, num_splits, dtype=torch.float32, seed=0, width=None):
    from splitserve.kernels import attention_triton as at

    k_cache, v_cache = noise_cache(bs, hk, seed, dtype)
    tables, pad_ids = tables_for(lens, bs, seed + 1)
    bt = padded(tables, pad_ids, width)
    q = torch.randn(len(lens), hq, D, generator=gen(seed + 2)).to(dtype)
    ctx = torch.tensor(lens)
    scale = 1 / math.sqrt(D)
    out = poisoned(q.shape, dtype)
    cfg = at.DecodeConfig(block_n=8, min_partition=8)
    got = at.paged_decode_attention(q, k_cache, v_cache, bt, ctx, scale, window, out=out,
                                    num_splits=num_splits, cfg=cfg)
    assert got is out
    want = paged_decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), bt, ctx, scale, window)
    return got, want


@HEADS
@pytest.mark.parametrize("bs", [4, 16])
@pytest.mark.parametrize("num_splits", [1, 3, None], ids=["one_split", "three_splits", "heuristic"])
def test_decode_matches_reference_float32(hq, hk, bs, num_splits):
    lens = [1, 5, bs + 1, 3 * bs + 2, 37]
    got, want = _decode(hq, hk, bs, lens, None, num_splits, seed=bs + hq)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 5, 12])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_sliding_window_matches_reference(window, num_splits):
    got, want = _decode(4, 2, 4, [1, 3, 6, 13, 30], window, num_splits, seed=window)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_decode_more_splits_than_context_leaves_empty_splits_harmless():
    """Tables padded far past every context (a CUDA-graph bucket): most splits see no key."""
    got, want = _decode(4, 2, 4, [1, 2, 9], None, 8, width=9, seed=7)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_decode_merges_in_the_kernel_as_the_merge_launch_does():
    """The last program of each (sequence, KV head) merging the splits (``merge_in_kernel``)
    against `_decode_merge_kernel` (the default): a context of 0 (a padded graph row), empty splits,
    a query group that is not a power of two, more splits than one merge step holds; the
    arrival counts left at zero."""
    from dataclasses import replace

    from splitserve.kernels import attention_triton as at

    bs, hq, hk = 4, 6, 2
    lens = [0, 5, 70]
    k_cache, v_cache = noise_cache(bs, hk, seed=11)
    tables, pad_ids = tables_for([max(n, 1) for n in lens], bs, seed=12)
    bt, ctx = padded(tables, pad_ids, width=18), torch.tensor(lens)  # 18 splits of 4 tokens
    q = torch.randn(len(lens), hq, D, generator=gen(13))
    cfg = at.DecodeConfig(block_n=4, min_partition=4, merge_in_kernel=1)
    counts = []
    real = at.arrival_counts
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(at, "arrival_counts", lambda *a: counts.append(real(*a)) or counts[-1])
        got = at.paged_decode_attention(q, k_cache, v_cache, bt, ctx, 0.3, num_splits=20, cfg=cfg)
    assert len(counts) == 1 and not counts[0].any()
    two = at.paged_decode_attention(q, k_cache, v_cache, bt, ctx, 0.3, num_splits=20,
                                    cfg=replace(cfg, merge_in_kernel=0))
    torch.testing.assert_close(got, two, atol=2e-6, rtol=1e-5)
    assert not got[0].any() and got.isfinite().all()
    want = paged_decode_attention_ref(q, k_cache, v_cache, bt, ctx, 0.3)
    torch.testing.assert_close(got[1:], want[1:], atol=2e-6, rtol=1e-5)


def test_decode_split_count_depends_only_on_shapes():
    """Graph capture needs the launch shape fixed by the tensors' shapes, not their values."""
    from splitserve.kernels import attention_triton as at

    dev = torch.device("cpu")
    a = at.decode_num_splits(8, 64 * 16, dev)
    assert a == at.decode_num_splits(8, 64 * 16, dev)
    assert at.decode_num_splits(1, 16, dev) == 1  # under min_partition: never split
    assert at.decode_num_splits(1, 4096, dev) > 1


def test_decode_config_env_overrides_the_default(monkeypatch):
    """SPLITSERVE_DECODE_CONFIG replaces the fields it names; calls without ``cfg`` use it."""
    from dataclasses import replace

    from splitserve.kernels import attention_triton as at

    monkeypatch.setenv(at.DECODE_CONFIG_ENV, "block_n=8, warps=2,min_partition=8")
    at.default_decode_config.cache_clear()
    try:
        assert at.default_decode_config() == replace(at.DECODE, block_n=8, num_warps=2, min_partition=8)
        monkeypatch.setenv(at.DECODE_CONFIG_FP8_ENV, "widen=1,warps=8,maxnreg=96")  # FP8 caches only, applied last
        at.default_decode_config.cache_clear()
        fp8 = at.default_decode_config(fp8=True)
        assert fp8 == replace(at.DECODE_FP8, block_n=8, num_warps=8, min_partition=8, widen_early=1, max_registers=96)
        assert at.default_decode_config() == replace(at.DECODE, block_n=8, num_warps=2, min_partition=8)
        assert at.DecodeConfig.parse(fp8.spec()) == fp8
        assert at.DecodeConfig.parse(at.DECODE.spec(), base=at.DECODE_FP8) == at.DECODE  # every field named
        with pytest.raises(ValueError, match="widen_early"):
            at.DecodeConfig.parse("widen=2")
        with pytest.raises(ValueError, match="max_registers"):
            at.DecodeConfig.parse("maxnreg=8")
        with pytest.raises(ValueError, match="short_warps"):
            at.DecodeConfig.parse("short_warps=3")
        assert "short_warps=4" in at.DecodeConfig.parse("short_warps=4").spec().split(",")
        assert at.DecodeConfig.parse("merge=0").merge_in_kernel == 0
        with pytest.raises(ValueError, match="merge_in_kernel"):
            at.DecodeConfig.parse("merge=2")

        k_cache, v_cache = noise_cache(4, 2, seed=5)
        tables, pad_ids = tables_for([3, 30], 4, seed=6)
        bt, ctx = padded(tables, pad_ids), torch.tensor([3, 30])
        q = torch.randn(2, 4, D, generator=gen(7))
        got = at.paged_decode_attention(q, k_cache, v_cache, bt, ctx, 0.25)  # 8-token steps: 2 pages each
    finally:
        at.default_decode_config.cache_clear()
    torch.testing.assert_close(got, paged_decode_attention_ref(q, k_cache, v_cache, bt, ctx, 0.25),
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("context_blocks,splits,warps", [(4, 1, 4), (4, 2, 4), (64, 1, 2), (64, 2, 2), (64, 16, 4)])
def test_fp8_launch_takes_short_warps_for_short_shares(monkeypatch, context_blocks, splits, warps):
    """`DecodeConfig.short_warps` applies when a program's share is at most SHORT_PARTITION
    tokens, split or not; `warm_up` compiles all four (share, split) variants."""
    from dataclasses import replace

    from splitserve.kernels import attention_triton as at

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((grid[1], kw["num_warps"]))

    monkeypatch.setattr(at, "_decode_kernel", Recorder())
    monkeypatch.setattr(at, "_decode_merge_kernel", Recorder())
    bs, hk = 16, 2
    cache = torch.zeros(2, bs, hk, D).to(torch.float8_e4m3fn)
    scales = {"k_scale": torch.ones(hk), "v_scale": torch.ones(hk)}
    q = torch.zeros(1, 4, D, dtype=torch.bfloat16)
    tables = torch.zeros(1, context_blocks, dtype=torch.int64)
    cfg = replace(at.DECODE_FP8, block_n=16)
    at.paged_decode_attention(q, cache, cache, tables, torch.tensor([3]), 0.1, num_splits=splits, cfg=cfg, **scales)
    grid_splits, got = launches[0]
    assert got == warps and (grid_splits > 1) == (splits > 1)
    launches.clear()
    at.warm_up(cache, cache, num_heads=4, scale=0.1, dtype=torch.bfloat16, **scales)
    decode = {(s > 1, w) for s, w in launches if w != 1}  # the merge runs one warp
    assert decode == {(False, 4), (True, 4), (False, 2), (True, 2)}


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_bfloat16_within_bf16_error(num_splits):
    got, want = _decode(4, 2, 8, [1, 9, 40, 64], None, num_splits, dtype=torch.bfloat16, seed=3)
    assert got.dtype == torch.bfloat16
    assert not got.isnan().any()
    assert rel_err(got, want) < 1e-2


# ---- prefill -----------------------------------------------------------------------------


class Chunk:
    def __init__(self, start, num_tokens, context_len, block_table):
        self.start, self.num_tokens, self.context_len, self.block_table = start, num_tokens, context_len, block_table


def _ragged_case(hq, hk, bs, chunks, dtype=torch.float32, seed=0, gap=0):
    """chunks: [(prefix_len, chunk_len)]. Writes every sequence's K/V (prefix + chunk) into
    the cache; returns q/k/v rows of the flattened batch (``gap`` junk rows between chunks)."""
    k_cache, v_cache = noise_cache(bs, hk, seed, dtype)
    tables, _ = tables_for([p + c for p, c in chunks], bs, seed + 1)
    g = gen(seed + 2)
    total = sum(c for _, c in chunks) + gap * len(chunks)
    q = torch.randn(total, hq, D, generator=g).to(dtype)
    k = torch.randn(total, hk, D, generator=g).to(dtype)
    v = torch.randn(total, hk, D, generator=g).to(dtype)
    plan, row = [], 0
    for (prefix, n), table in zip(chunks, tables):
        ctx = prefix + n
        k_prefix = torch.randn(prefix, hk, D, generator=g).to(dtype)
        v_prefix = torch.randn(prefix, hk, D, generator=g).to(dtype)
        slots = torch.tensor([table[t // bs] * bs + t % bs for t in range(ctx)])
        write_kv_ref(k_cache, v_cache, torch.cat([k_prefix, k[row:row + n]]), torch.cat([v_prefix, v[row:row + n]]),
                     slots)
        plan.append(Chunk(row, n, ctx, torch.tensor(table, dtype=torch.int64)))
        row += n + gap
    return k_cache, v_cache, q, k, v, plan


def _ref_rows(q, k, v, k_cache, v_cache, plan, scale, window, use_new):
    want = torch.zeros(q.shape, dtype=torch.float32)
    for c in plan:
        rows = slice(c.start, c.start + c.num_tokens)
        kw = {"k_new": k[rows].float(), "v_new": v[rows].float()} if use_new else {}
        want[rows] = paged_prefill_attention_ref(q[rows].float(), k_cache.float(), v_cache.float(), c.block_table,
                                                 c.context_len, scale, window, **kw)
    return want


def _check_rows(got, want, plan, check):
    for c in plan:
        rows = slice(c.start, c.start + c.num_tokens)
        check(got[rows], want[rows])


@HEADS
@pytest.mark.parametrize("bs", [4, 16])
@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
def test_ragged_prefill_with_cached_prefixes_matches_reference(hq, hk, bs, window):
    from splitserve.kernels import attention_triton as at

    chunks = [(0, 7), (5, 3), (bs + 3, 20), (2 * bs, 1)]
    k_cache, v_cache, q, k, v, plan = _ragged_case(hq, hk, bs, chunks, seed=hq + bs, gap=2)
    out = poisoned(q.shape, q.dtype)
    cfg = at.PrefillConfig(block_m=16, block_n=8, num_warps=4, num_stages=1)
    at.paged_prefill_attention_ragged(q, k_cache, v_cache, at.RaggedPrefill.from_chunks(plan), 0.25, window,
                                      k, v, out=out, cfg=cfg)
    want = _ref_rows(q, k, v, k_cache, v_cache, plan, 0.25, window, use_new=False)
    _check_rows(out, want, plan, lambda a, b: torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5))
    junk = torch.ones(q.shape[0], dtype=torch.bool)
    for c in plan:
        junk[c.start:c.start + c.num_tokens] = False
    assert out[junk].isnan().all(), "rows outside every chunk must be left untouched"


@HEADS
@pytest.mark.parametrize("window", [None, 3])
def test_ragged_prefill_without_prefix_reads_new_kv(hq, hk, window):
    """No chunk has a prefix: the keys come from k/v directly (the cache is zeroed to prove it)."""
    from splitserve.kernels import attention_triton as at

    chunks = [(0, 9), (0, 17), (0, 1)]
    k_cache, v_cache, q, k, v, plan = _ragged_case(hq, hk, 4, chunks, seed=21 + hq)
    want = _ref_rows(q, k, v, k_cache, v_cache, plan, 0.3, window, use_new=True)
    k_cache.zero_(), v_cache.zero_()
    batch = at.RaggedPrefill.from_chunks(plan)
    assert batch.no_prefix
    out = poisoned(q.shape, q.dtype)
    at.paged_prefill_attention_ragged(q, k_cache, v_cache, batch, 0.3, window, k, v, out=out,
                                      cfg=at.PrefillConfig(16, 16, 4, 1))
    _check_rows(out, want, plan, lambda a, b: torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5))


def test_ragged_prefill_default_config_float32():
    from splitserve.kernels import attention_triton as at

    chunks = [(3, 40), (0, 33)]
    k_cache, v_cache, q, k, v, plan = _ragged_case(4, 2, 16, chunks, seed=31)
    out = at.paged_prefill_attention_ragged(q, k_cache, v_cache, at.RaggedPrefill.from_chunks(plan), 0.25)
    want = _ref_rows(q, k, v, k_cache, v_cache, plan, 0.25, None, use_new=False)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)


def test_ragged_prefill_bfloat16_within_bf16_error():
    from splitserve.kernels import attention_triton as at

    chunks = [(0, 24), (9, 12)]
    k_cache, v_cache, q, k, v, plan = _ragged_case(4, 2, 8, chunks, dtype=torch.bfloat16, seed=41)
    out = at.paged_prefill_attention_ragged(q, k_cache, v_cache, at.RaggedPrefill.from_chunks(plan), 0.25, None,
                                            k, v, cfg=at.PrefillConfig(16, 16, 4, 1))
    want = _ref_rows(q, k, v, k_cache, v_cache, plan, 0.25, None, use_new=False)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    assert rel_err(out, want) < 1e-2


def test_one_chunk_call_matches_reference():
    from splitserve.kernels import attention_triton as at

    chunks = [(6, 10)]
    k_cache, v_cache, q, k, v, plan = _ragged_case(4, 2, 4, chunks, seed=51)
    (c,) = plan
    # The table may be longer than the context (the engine passes the sequence's whole table).
    table = torch.cat([c.block_table, torch.tensor([NUM_BLOCKS - 1])])
    got = at.paged_prefill_attention(q, k_cache, v_cache, table, c.context_len, 0.3, None)
    want = paged_prefill_attention_ref(q, k_cache, v_cache, table, c.context_len, 0.3, None)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_dispatch_triton_mode_matches_reference_path(monkeypatch):
    """The engine's call (`dispatch.prefill_attention` / `paged_decode_attention`) under
    SPLITSERVE_KERNELS=triton gives the reference path's rows."""
    from splitserve.kernels import dispatch

    chunks = [(0, 6), (4, 5)]
    k_cache, v_cache, q, k, v, plan = _ragged_case(4, 2, 4, chunks, seed=61)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    dispatch.kernel_mode.cache_clear()
    want = dispatch.prefill_attention(q, k, v, k_cache, v_cache, plan, 0.3, None, torch.zeros_like(q))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    dispatch.kernel_mode.cache_clear()
    try:
        got = dispatch.prefill_attention(q, k, v, k_cache, v_cache, plan, 0.3, None, torch.zeros_like(q))
        bt = torch.stack([c.block_table[:2] for c in plan])
        lens = torch.tensor([5, 8])
        dec = dispatch.paged_decode_attention(q[:2], k_cache, v_cache, bt, lens, 0.3, out=torch.empty_like(q[:2]))
    finally:
        dispatch.kernel_mode.cache_clear()
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(dec, paged_decode_attention_ref(q[:2], k_cache, v_cache, bt, lens, 0.3),
                               atol=2e-6, rtol=1e-5)


def test_warm_up_runs_every_variant_without_touching_the_cache():
    from splitserve.kernels import attention_triton

    k_cache, v_cache = noise_cache(4, 2, seed=31)
    before = (k_cache.clone(), v_cache.clone())
    attention_triton.warm_up(k_cache, v_cache, num_heads=4, scale=D**-0.5)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_transposed_loop_matches_the_reference(dtype, num_splits):
    from splitserve.kernels import attention_triton as at

    bs, hq, hk = 4, 4, 2
    lens = [1, 5, 3 * bs + 2, 37]
    k_cache, v_cache = noise_cache(bs, hk, 3, dtype)
    tables, pad_ids = tables_for(lens, bs, 4)
    bt = padded(tables, pad_ids, None)
    q = torch.randn(len(lens), hq, D, generator=gen(5)).to(dtype)
    ctx = torch.tensor(lens)
    cfg = at.DecodeConfig(block_n=16, min_partition=8, swap=1)
    got = at.paged_decode_attention(q, k_cache, v_cache, bt, ctx, D**-0.5, None, num_splits=num_splits, cfg=cfg)
    want = paged_decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), bt, ctx, D**-0.5, None)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    else:
        assert rel_err(got, want) < 1e-2
    assert at.DecodeConfig.parse("swap=1").swap == 1 and "swap=1" in cfg.spec()


def test_ragged_prefill_views_start_16_byte_aligned_for_any_number_of_chunks():
    """Triton compiles a variant per pointer alignment: the per-chunk vectors must start 16-byte
    aligned however many chunks a step has, or a new count would compile mid-serving."""
    from splitserve.kernels import attention_triton as at

    for n in range(1, 7):
        chunks = [at._Chunk(0, 3 + i, 3 + i, torch.arange(2, dtype=torch.int64)) for i in range(n)]
        batch = at.RaggedPrefill.from_chunks(chunks)
        assert [t.tolist() for t in (batch.q_starts, batch.q_lens, batch.context_lens)] == [
            [0] * n, [3 + i for i in range(n)], [3 + i for i in range(n)]]
        assert all(t.data_ptr() % 16 == 0 for t in (batch.q_starts, batch.q_lens, batch.context_lens))
