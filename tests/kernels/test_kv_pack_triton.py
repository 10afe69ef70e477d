"""KV block pack/unpack in Triton (kernels/kv_pack_triton.py) against the references, on CPU
in Triton's interpreter (`triton_interpreter`): any layer range, head range and block list."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels.kv_pack import pack_kv_blocks_ref, unpack_kv_blocks_ref

pytestmark = pytest.mark.usefixtures("triton_interpreter")

SHAPE = (3, 2, 10, 4, 4, 8)  # layers, K/V, blocks, block_size, kv_heads, head_dim


def cache(seed=0, dtype=torch.float32):
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


CASES = pytest.mark.parametrize("layers,heads", [
    (slice(None), slice(None)), (slice(1, 3), slice(0, 2)), (slice(2, 3), slice(3, 4)), (slice(0, 2), slice(1, 4)),
])


@CASES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_matches_reference(layers, heads, dtype):
    from splitserve.kernels.kv_pack_triton import pack_kv_blocks

    c = cache(1, dtype)
    blocks = torch.tensor([7, 0, 3, 9])
    got = pack_kv_blocks(c, layers, heads, blocks)
    assert torch.equal(got, pack_kv_blocks_ref(c, layers, heads, blocks))
    out = torch.full_like(got, float("nan"))
    assert pack_kv_blocks(c, layers, heads, blocks, out) is out
    assert torch.equal(out, got)


@CASES
def test_unpack_matches_reference_and_touches_nothing_else(layers, heads):
    from splitserve.kernels.kv_pack_triton import unpack_kv_blocks

    blocks = torch.tensor([2, 8, 5])
    buf = pack_kv_blocks_ref(cache(2), layers, heads, torch.tensor([1, 4, 6]))
    got, want = cache(3), cache(3)
    unpack_kv_blocks(got, layers, heads, blocks, buf)
    unpack_kv_blocks_ref(want, layers, heads, blocks, buf)
    assert torch.equal(got, want)


def test_bad_buffer_is_a_clear_error():
    from splitserve.kernels.kv_pack_triton import pack_kv_blocks

    with pytest.raises(ValueError, match="contiguous"):
        pack_kv_blocks(cache(), slice(None), slice(None), torch.tensor([1]), torch.empty(1))
