"""Packing KV blocks for a transfer in Triton: the CUDA path beside `kv_pack.py`.

Same layout as the reference: the (layers, heads) slice of the listed blocks of a cache
``[layers, 2, blocks, block_size, kv_heads, head_dim]`` <-> one contiguous buffer
``[len(layers), 2, len(blocks), block_size, len(heads), head_dim]``. One program per
(listed block, layer x K/V) copies that block's ``block_size`` rows of ``len(heads) *
head_dim`` contiguous elements, in one launch for the whole message (the torch gather of a
head slice first walks a strided view).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl


# The block count and offset change with every transfer: no compile per specialisation of them.
@triton.jit(do_not_specialize=["num_blocks", "cache_offset"])
def _copy_blocks_kernel(
    cache_ptr, buf_ptr, blocks_ptr, num_blocks,
    stride_layer, stride_kv, stride_block, stride_token, cache_offset,
    ROW: tl.constexpr, BLOCK_SIZE: tl.constexpr, TOKENS_PAD: tl.constexpr, COLS: tl.constexpr,
    UNPACK: tl.constexpr,
):
    index = tl.program_id(0)
    layer_kv = tl.program_id(1).to(tl.int64)  # layer * 2 + (0 for K, 1 for V), in the slice
    block = tl.load(blocks_ptr + index).to(tl.int64)
    cache_base = cache_ptr + cache_offset + (layer_kv // 2) * stride_layer + (layer_kv % 2) * stride_kv \
        + block * stride_block
    buf_base = buf_ptr + (layer_kv * num_blocks + index) * (BLOCK_SIZE * ROW)
    tokens = tl.arange(0, TOKENS_PAD)
    for c0 in range(0, ROW, COLS):
        cols = c0 + tl.arange(0, COLS)
        mask = (tokens[:, None] < BLOCK_SIZE) & (cols[None, :] < ROW)
        cache_at = cache_base + tokens[:, None] * stride_token + cols[None, :]
        buf_at = buf_base + tokens[:, None] * ROW + cols[None, :]
        if UNPACK:
            tl.store(cache_at, tl.load(buf_at, mask=mask), mask=mask)
        else:
            tl.store(buf_at, tl.load(cache_at, mask=mask), mask=mask)


def _launch(cache: torch.Tensor, layers: slice, heads: slice, blocks: torch.Tensor, buf: torch.Tensor,
            unpack: bool) -> None:
    num_layers, two, _, block_size, num_kv_heads, head_dim = cache.shape
    layer_ids = range(num_layers)[layers]
    head_ids = range(num_kv_heads)[heads]
    if layer_ids.step != 1 or head_ids.step != 1:
        raise ValueError("layer and head slices must be contiguous ranges")
    if cache.stride(-1) != 1 or cache.stride(-2) != head_dim:
        raise ValueError(f"cache heads x head_dim must be contiguous, got strides {cache.stride()}")
    shape = (len(layer_ids), two, len(blocks), block_size, len(head_ids), head_dim)
    if tuple(buf.shape) != shape or not buf.is_contiguous() or buf.dtype != cache.dtype:
        raise ValueError(f"buffer must be a contiguous {cache.dtype} tensor of shape {shape}, "
                         f"got {buf.dtype} {tuple(buf.shape)}")
    if not buf.numel():
        return
    row = len(head_ids) * head_dim
    tokens_pad = triton.next_power_of_2(block_size)
    cols = max(16, min(triton.next_power_of_2(row), 4096 // tokens_pad))
    offset = layer_ids.start * cache.stride(0) + head_ids.start * head_dim
    with torch.cuda.device(cache.device) if cache.is_cuda else nullcontext():
        # A receiver thread's current device may not be the cache's: launch on the cache's.
        _copy_blocks_kernel[(len(blocks), 2 * len(layer_ids))](
            cache, buf, blocks, len(blocks),
            cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3), offset,
            ROW=row, BLOCK_SIZE=block_size, TOKENS_PAD=tokens_pad, COLS=cols, UNPACK=unpack,
            num_warps=4,
        )


def pack_kv_blocks(cache: torch.Tensor, layers: slice, heads: slice, blocks: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Gather ``blocks`` (int64 ids) of the (layers, heads) view into ``out`` (or a new
    buffer), as `pack_kv_blocks_ref`."""
    if out is None:
        num_layers, two, _, block_size, num_kv_heads, head_dim = cache.shape
        shape = (len(range(num_layers)[layers]), two, len(blocks), block_size, len(range(num_kv_heads)[heads]), head_dim)
        out = torch.empty(shape, dtype=cache.dtype, device=cache.device)
    _launch(cache, layers, heads, blocks, out, unpack=False)
    return out


def unpack_kv_blocks(cache: torch.Tensor, layers: slice, heads: slice, blocks: torch.Tensor,
                     buf: torch.Tensor) -> None:
    """Scatter a packed ``buf`` into ``blocks`` of the (layers, heads) view, as
    `unpack_kv_blocks_ref`."""
    _launch(cache, layers, heads, blocks, buf, unpack=True)
