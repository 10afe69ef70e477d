"""The FP8 scales' rules (workers/kv_scales.py): powers of two with headroom from an amax,
checkpoint scales sliced per rank (scalar or per head, all layers or none), the group's
fingerprint put together from its ranks' slices."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels.attention import FP8_MAX
from splitserve.workers import kv_scales


def test_scales_from_amax_are_powers_of_two_with_headroom():
    amax = torch.tensor([[0.3, 10.0], [0.0, 448.0]])
    scales = kv_scales.scales_from_amax(amax)
    assert torch.equal(scales, torch.exp2(torch.log2(scales).round()))
    assert scales[1, 0] == 1.0  # nothing seen: nothing to scale
    nonzero = amax > 0
    ratio = (amax * kv_scales.MARGIN / FP8_MAX)[nonzero] / scales[nonzero]
    assert bool(((ratio > 0.5) & (ratio <= 1.0)).all())  # the smallest power of two above
    # Last-bit differences of another layout land on the same scale, except at a power of two
    # (448 * 4 / 448 = 4 exactly): the one case the groups' fingerprint check must catch.
    moved = kv_scales.scales_from_amax(amax * (1 + 1e-6))
    assert torch.equal(moved[0], scales[0]) and moved[1, 1] == 2 * scales[1, 1]


def test_calibration_sequence_is_fixed_and_in_range():
    ids = kv_scales.calibration_token_ids(300, 1000)
    assert ids == kv_scales.calibration_token_ids(300, 1000) and len(ids) == kv_scales.CALIBRATION_TOKENS
    assert all(0 <= i < 300 for i in ids) and len(set(ids)) > 50
    assert len(kv_scales.calibration_token_ids(300, 10)) == 10


def test_checkpoint_scales_split_from_the_weights_and_sliced_per_rank():
    weights = [("model.layers.0.self_attn.k_scale", torch.tensor(0.5)),
               ("model.layers.0.self_attn.v_scale", torch.tensor([0.1, 0.2, 0.3, 0.4])),
               ("model.layers.1.self_attn.attn.k_scale", torch.tensor([1.0])),
               ("model.layers.1.self_attn.attn.v_scale", torch.tensor(2.0)),
               ("model.layers.0.self_attn.q_proj.weight", torch.zeros(2))]
    found = {}
    assert [n for n, _ in kv_scales.split_checkpoint_scales(weights, found)] == ["model.layers.0.self_attn.q_proj.weight"]
    got = kv_scales.checkpoint_scales(found, range(0, 2), range(2, 4), 4)  # tp rank 1 of 2
    assert torch.equal(got, torch.tensor([[[0.5, 0.5], [0.3, 0.4]], [[1.0, 1.0], [2.0, 2.0]]]))
    assert kv_scales.checkpoint_scales({}, range(2), range(4), 4) is None
    with pytest.raises(ValueError, match="some layers but not"):
        kv_scales.checkpoint_scales(found, range(0, 3), range(4), 4)
    with pytest.raises(ValueError, match="expected 1"):
        kv_scales.checkpoint_scales({**found, (0, 0): torch.ones(3)}, range(2), range(4), 4)


def test_fingerprint_of_assembled_rank_slices():
    full = torch.rand(4, 2, 4, generator=torch.Generator().manual_seed(0))
    # pp 2 x tp 2: each rank holds 2 layers x 2 heads.
    slices = [kv_scales.rank_scales(full[l:l + 2, :, h:h + 2], l, h) for l in (0, 2) for h in (0, 2)]
    assert torch.equal(kv_scales.assemble_scales(slices, 4, 4), full)
    one = kv_scales.scales_fingerprint(full)
    assert one == kv_scales.scales_fingerprint(kv_scales.assemble_scales(slices, 4, 4))
    assert one != kv_scales.scales_fingerprint(full * 2)
    with pytest.raises(ValueError, match="do not cover"):
        kv_scales.assemble_scales(slices[:3], 4, 4)
