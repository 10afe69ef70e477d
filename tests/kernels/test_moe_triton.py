"""The fused MoE kernels in Triton (kernels/moe_triton.py) against `fused_moe_ref`, on CPU in
Triton's interpreter (`triton_interpreter`), at tiny shapes: random routing with experts that
get no token, one token, token counts off the block size, expert-parallel offsets that skip
other ranks' ids, and the alignment's two implementations against each other."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels.moe import ExpertWeights, fused_moe_ref

pytestmark = pytest.mark.usefixtures("triton_interpreter")

HIDDEN, INTER = 32, 48  # 48: the intermediate tiles of 32 end in a masked tail


def make_case(num_tokens: int, num_experts: int, top_k: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, HIDDEN, generator=g).to(dtype)
    w13 = (torch.randn(num_experts, 2 * INTER, HIDDEN, generator=g) / HIDDEN ** 0.5).to(dtype)
    w2 = (torch.randn(num_experts, HIDDEN, INTER, generator=g) / INTER ** 0.5).to(dtype)
    # top_k distinct experts per token, as the router gives.
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)]
                      or [torch.zeros(0, top_k, dtype=torch.long)]).view(num_tokens, top_k)
    weights = torch.rand(num_tokens, top_k, generator=g)
    return x, w13, w2, weights, ids.to(torch.int32)


def check_layout(sorted_pairs, block_expert, ids, num_experts, offset, block_m):
    """Every local pair in exactly one row of its expert's blocks; padding elsewhere."""
    num_pairs = ids.numel()
    flat = ids.reshape(-1).long() - offset
    local = {p for p in range(num_pairs) if 0 <= flat[p] < num_experts}
    rows = sorted_pairs.view(-1, block_m)
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        real = [p for p in rows[b].tolist() if p < num_pairs]
        if e < 0:
            assert not real
            continue
        assert all(flat[p] == e for p in real)
        seen += real
    assert sorted(seen) == sorted(local)


@pytest.mark.parametrize("num_tokens,num_experts,top_k,offset,block_m", [
    (1, 8, 2, 0, 16), (13, 8, 3, 0, 16), (40, 6, 2, 2, 16), (9, 5, 5, 0, 32)])
def test_alignment_kernel_and_torch_agree(num_tokens, num_experts, top_k, offset, block_m):
    from splitserve.kernels.moe_triton import align_by_expert

    ids = make_case(num_tokens, num_experts + offset + 1, top_k, seed=num_tokens)[4]
    got_kernel = align_by_expert(ids, num_experts, offset, block_m, use_kernel=True)
    got_torch = align_by_expert(ids, num_experts, offset, block_m, use_kernel=False)
    for got in (got_kernel, got_torch):
        check_layout(*got, ids, num_experts, offset, block_m)
    # Same layout (within an expert, pairs in token order) from both.
    assert torch.equal(got_kernel[0], got_torch[0]) and torch.equal(got_kernel[1], got_torch[1])


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [
    (1, 8, 2),    # decode: one token, no alignment
    (3, 16, 4),   # more experts than pairs: empty experts, spare blocks
    (37, 6, 2),   # several blocks per expert, a partial last block
])
def test_matches_reference(num_tokens, num_experts, top_k):
    from splitserve.kernels.moe_triton import fused_moe_triton

    x, w13, w2, weights, ids = make_case(num_tokens, num_experts, top_k, seed=num_tokens)
    got = fused_moe_triton(x, ExpertWeights(w13, w2), weights, ids)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, fused_moe_ref(x, ExpertWeights(w13, w2), weights, ids), atol=1e-5, rtol=1e-5)


# 2 tokens: no alignment (a block per pair); 11: aligned.
@pytest.mark.parametrize("num_tokens", [2, 11])
def test_expert_parallel_skips_other_ranks_ids(num_tokens):
    """Rank holding experts 4..9 of 12: choices of 0..3 and 10..11 contribute nothing, and a
    token routed only elsewhere comes out zero."""
    from splitserve.kernels.moe_triton import fused_moe_triton

    x, w13, w2, weights, ids = make_case(num_tokens, 12, 3, seed=5)
    ids[0] = torch.tensor([0, 1, 11], dtype=torch.int32)  # nothing local
    local_w13, local_w2 = w13[4:10], w2[4:10]
    got = fused_moe_triton(x, ExpertWeights(local_w13, local_w2), weights, ids, expert_offset=4)
    want = fused_moe_ref(x, ExpertWeights(local_w13, local_w2), weights, ids, expert_offset=4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0], torch.zeros(HIDDEN))
    # The ranks' outputs add up to the whole layer's.
    rest = [fused_moe_triton(x, ExpertWeights(w13[a:b], w2[a:b]), weights, ids, expert_offset=a) for a, b in ((0, 4), (10, 12))]
    torch.testing.assert_close(got + sum(rest), fused_moe_ref(x, ExpertWeights(w13, w2), weights, ids), atol=1e-5, rtol=1e-5)


def test_prefill_sizes_take_the_torch_alignment_and_wider_blocks(monkeypatch):
    """Above the kernel's pair limit the alignment is torch ops, the blocks the prefill config's."""
    from splitserve.kernels import moe_triton

    monkeypatch.setattr(moe_triton, "ALIGN_TRITON_MAX_PAIRS", 8)
    cfg = moe_triton.MoeConfig(block_m=32, block_n1=16, block_k1=16, block_n2=16, block_k2=32)
    x, w13, w2, weights, ids = make_case(21, 4, 2, dtype=torch.float16, seed=7)
    got = moe_triton.fused_moe_triton(x, ExpertWeights(w13, w2), weights, ids, config=cfg)
    want = fused_moe_ref(x.float(), ExpertWeights(w13.float(), w2.float()), weights, ids)
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


def test_no_tokens():
    from splitserve.kernels.moe_triton import fused_moe_triton

    x, w13, w2, weights, ids = make_case(0, 4, 2)
    assert ids.shape == (0, 2)
    assert fused_moe_triton(x, ExpertWeights(w13, w2), weights, ids).shape == (0, HIDDEN)


def test_config_choice_and_specs():
    from splitserve.kernels.moe_triton import CONFIGS, W8A8_WIDE, MoeConfig, max_blocks, moe_config

    assert moe_config(8).block_m == 16  # decode: the smallest tile
    assert moe_config(16 * 2048 * 8).block_m == CONFIGS[-1][1].block_m
    # FP8 experts as W8A8 at prefill sizes: the 128 x 128 x 128 tiles e4m3 fits in shared memory.
    assert moe_config(16 * 2048 * 8, w8a8=True) == W8A8_WIDE
    assert moe_config(512, w8a8=True) == moe_config(512)
    cfg = MoeConfig.parse("block_m=32, n1=64;warps=8")
    assert (cfg.block_m, cfg.block_n1, cfg.num_warps, cfg.block_k2) == (32, 64, 8, MoeConfig().block_k2)
    assert MoeConfig.parse(cfg.spec()) == cfg
    for bad in ("block_m=8", "n1=48", "tile=16", "warps"):
        with pytest.raises(ValueError):
            MoeConfig.parse(bad)
    # One pair per expert: one block each; worst case pads every non-empty expert.
    assert max_blocks(8, 128, 16) == 8
    assert max_blocks(64 * 8, 128, 16) == (512 + 128 * 15) // 16


def test_dispatch_runs_the_triton_kernel_when_asked(monkeypatch):
    from splitserve.kernels import dispatch, moe_triton

    calls = []
    kernel = moe_triton.fused_moe_triton
    monkeypatch.setattr(moe_triton, "fused_moe_triton", lambda *a, **kw: calls.append(a) or kernel(*a, **kw))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    dispatch.kernel_mode.cache_clear()
    try:
        x, w13, w2, weights, ids = make_case(5, 6, 2, seed=9)
        got = dispatch.fused_moe(x, ExpertWeights(w13[1:], w2[1:]), weights, ids, 1)
    finally:
        dispatch.kernel_mode.cache_clear()
    assert len(calls) == 1
    torch.testing.assert_close(got, fused_moe_ref(x, ExpertWeights(w13[1:], w2[1:]), weights, ids, 1), atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deferred_slots_are_summed_by_the_next_add_rms_norm_as_by_the_combine(dtype):
    """``defer_combine``: the call returns its weighted slots; the residual add + RMSNorm that
    sums them gives bit for bit what the combine launch followed by the plain add + RMSNorm
    gives (an expert-parallel rank, one token routed only elsewhere)."""
    from splitserve.kernels import dispatch, moe_triton, norm_triton
    from splitserve.kernels import fp8 as fp8_ref
    from splitserve.kernels.moe import ExpertSlots

    x, w13, w2, weights, ids = make_case(5, 12, 3, dtype=dtype, seed=11)
    ids[0] = torch.tensor([0, 1, 11], dtype=torch.int32)
    experts = ExpertWeights(w13[4:10], w2[4:10])
    pending = moe_triton.fused_moe_triton(x, experts, weights, ids, expert_offset=4, defer_combine=True)
    assert isinstance(pending, ExpertSlots) and pending.shape == x.shape and pending.dtype == dtype
    # Other ranks' slots are never written, and must never be read: NaN there, whatever the
    # allocator handed out.
    local = (ids >= 4) & (ids < 10)
    pending.slots.view(-1, 3, HIDDEN)[~local] = float("nan")
    summed = moe_triton.fused_moe_triton(x, experts, weights, ids, expert_offset=4)
    assert torch.equal(dispatch.combined(pending), summed) and dispatch.combined(summed) is summed
    g = torch.Generator().manual_seed(12)
    res, w = torch.randn(5, HIDDEN, generator=g).to(dtype), torch.randn(HIDDEN, generator=g).to(dtype)
    got, want = norm_triton.add_rms_norm(pending, res, w, 1e-6), norm_triton.add_rms_norm(summed, res, w, 1e-6)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[1][0], res[0])  # nothing local: the residual alone
    rows, summed_too = norm_triton.add_rms_norm(pending, res, w, 1e-6, quantize=True)  # both folds at once
    q, scale = fp8_ref.quantize_per_token(want[0])
    assert torch.equal(rows.x, want[0]) and torch.equal(summed_too, want[1])
    assert torch.equal(rows.q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(rows.scale, scale)


# ---- FP8 (e4m3) experts, weight-only ----------------------------------------------------------


@pytest.mark.parametrize("scheme,block,config", [
    ("channel", None, None), ("block", (16, 32), None), ("block", (32, 16), None),
    ("block", (32, 32), "n1=16,k1=16,n2=16,k2=16")])
@pytest.mark.parametrize("num_tokens", [1, 11])
def test_fp8_experts_match_the_dequantized_reference(scheme, block, config, num_tokens):
    """Per-row and block scales, direct and aligned: blocks narrower than the built-in tiles (the
    launch narrows its tiles; INTER 48 over 32-row blocks leaves a partial block at the end of
    gate and of up) and wider than the given tiles (several tiles and steps share a scale, as
    128-wide blocks do with decode's 32-wide tiles)."""
    from splitserve.kernels.fp8 import Fp8Scheme
    from splitserve.kernels.moe import quantize_experts
    from splitserve.kernels.moe_triton import MoeConfig, fused_moe_triton

    x, w13, w2, weights, ids = make_case(num_tokens, 6, 2, seed=num_tokens + 100)
    experts = quantize_experts(w13, w2, Fp8Scheme(scheme), *([block] if block else []))
    assert experts.w13.dtype == torch.float8_e4m3fn
    want = fused_moe_ref(x, experts, weights, ids)
    # e4m3 rounding is visible: the reference is of the FP8 values, not of the float weights.
    assert (want - fused_moe_ref(x, ExpertWeights(w13, w2), weights, ids)).abs().max() > 1e-3
    cfg = MoeConfig.parse(config) if config else None
    torch.testing.assert_close(fused_moe_triton(x, experts, weights, ids, config=cfg, dot_f16=False), want,
                               atol=1e-5, rtol=1e-5)
    # Widened to float16 (the GPU default for 16-bit x): x rounded to float16 as well.
    torch.testing.assert_close(fused_moe_triton(x, experts, weights, ids, config=cfg, dot_f16=True), want,
                               atol=5e-3, rtol=5e-3)


def test_fp8_experts_skip_other_ranks_ids():
    from splitserve.kernels.fp8 import Fp8Scheme
    from splitserve.kernels.moe import quantize_experts
    from splitserve.kernels.moe_triton import fused_moe_triton

    x, w13, w2, weights, ids = make_case(9, 12, 3, seed=5)
    local = quantize_experts(w13[4:10], w2[4:10], Fp8Scheme.CHANNEL)
    torch.testing.assert_close(fused_moe_triton(x, local, weights, ids, expert_offset=4, dot_f16=False),
                               fused_moe_ref(x, local, weights, ids, expert_offset=4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme,block", [("channel", None), ("block", (16, 32))])
@pytest.mark.parametrize("num_tokens", [1, 11])
def test_fp8_experts_w8a8_match_the_activation_quantizing_reference(scheme, block, num_tokens):
    """W8A8 (the prefill path): x and the intermediate quantized per token (and K group), e4m3 x
    e4m3 products: `fused_moe_ref` with quantize_activations, which differs from weight-only."""
    from splitserve.kernels.fp8 import Fp8Scheme
    from splitserve.kernels.moe import quantize_experts
    from splitserve.kernels.moe_triton import fused_moe_triton

    x, w13, w2, weights, ids = make_case(num_tokens, 6, 2, seed=num_tokens + 200)
    experts = quantize_experts(w13, w2, Fp8Scheme(scheme), *([block] if block else []))
    want = fused_moe_ref(x, experts, weights, ids, quantize_activations=True)
    assert (want - fused_moe_ref(x, experts, weights, ids)).abs().max() > 1e-3
    got = fused_moe_triton(x, experts, weights, ids, w8a8=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fp8_expert_arguments_are_checked():
    from splitserve.kernels.fp8 import Fp8Scheme
    from splitserve.kernels.moe import quantize_experts
    from splitserve.kernels.moe_triton import fused_moe_triton

    x, w13, w2, weights, ids = make_case(3, 4, 2)
    fp8 = quantize_experts(w13, w2, Fp8Scheme.CHANNEL)
    with pytest.raises(ValueError, match="without an FP8 scheme"):
        ExpertWeights(w13, fp8.w2)
    with pytest.raises(ValueError, match="differ"):
        ExpertWeights(w13, w2.double())
    with pytest.raises(ValueError, match="dot_f16 widens e4m3"):
        fused_moe_triton(x, ExpertWeights(w13, w2), weights, ids, dot_f16=True)
    with pytest.raises(ValueError, match="W8A8 needs FP8"):
        fused_moe_triton(x, ExpertWeights(w13, w2), weights, ids, w8a8=True)


def test_a_pipeline_stage_ending_in_a_moe_layer_hands_on_summed_tensors(monkeypatch):
    """pp 2, the first stage's last layer sparse: with the Triton kernels that layer's MoE call
    defers its combine (`ExpertSlots`, summed by the next layer's add + RMSNorm), but there is no
    next layer here: the stage must sum the slots itself and hand (hidden, residual) on as the
    tensors the references give."""
    import dataclasses

    from splitserve.kernels import dispatch
    from splitserve.kernels.moe import ExpertSlots
    from splitserve.mapping import Mapping
    from splitserve.workers.config import ModelConfig
    from splitserve.workers.model_source import random_config
    from splitserve.workers.models.attention import AttentionMetadata, PrefillChunk
    from splitserve.workers.models.llama import random_hf_weights
    from splitserve.workers.models.registry import build_model
    from splitserve.workers.parallel import ParallelState

    cfg = dataclasses.replace(ModelConfig.from_hf(random_config("tiny-qwen3-moe")), mlp_only_layers=())
    stage = build_model(cfg, ParallelState(Mapping(2, 0, 1, 2), None, False), torch.device("cpu"), torch.float32)
    stage.load_weights(random_hf_weights(cfg, seed=3))
    assert not stage.is_last and cfg.is_moe_layer(stage.layer_range.stop - 1)
    ids = torch.tensor([5, 9, 2, 7, 7, 1])

    def forward():
        caches = [(torch.zeros(1, 16, cfg.num_kv_heads, cfg.head_dim), torch.zeros(1, 16, cfg.num_kv_heads, cfg.head_dim))
                  for _ in stage.layer_range]
        meta = AttentionMetadata(slot_mapping=torch.arange(len(ids)), num_decode=0, decode_block_tables=None,
                                 decode_context_lens=None, prefills=(PrefillChunk(0, len(ids), len(ids), torch.zeros(1, dtype=torch.long)),))
        with torch.no_grad():
            return stage(ids, torch.arange(len(ids)), caches, meta)

    want = forward()
    summed = []
    combined = dispatch.combined
    monkeypatch.setattr(dispatch, "combined", lambda x: summed.append(type(x)) or combined(x))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    dispatch.kernel_mode.cache_clear()
    try:
        got = forward()
    finally:
        dispatch.kernel_mode.cache_clear()
    assert summed == [ExpertSlots]
    for g, w in zip(got, want, strict=True):
        assert type(g) is torch.Tensor
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
