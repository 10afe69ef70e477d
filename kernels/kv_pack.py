"""Packing KV blocks for a transfer, plain torch: the CPU path and the oracle for Triton.

The KV cache of a rank is one tensor ``[layers, 2, blocks, block_size, kv_heads, head_dim]``
(`workers/kv_cache.py`). A transfer message carries one layer range and one KV-head range of
a list of blocks: packed into one contiguous buffer
``[len(layers), 2, len(blocks), block_size, len(heads), head_dim]`` (blocks in the listed
order) on the sender, scattered back into the receiver's own block ids on the other side.
"""

from __future__ import annotations

import torch


def pack_kv_blocks_ref(cache: torch.Tensor, layers: slice, heads: slice, blocks: torch.Tensor,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Gather ``blocks`` (int64 ids) of the (layers, heads) view into ``out`` (or a new buffer)."""
    return torch.index_select(cache[layers][:, :, :, :, heads], 2, blocks, out=out)


def unpack_kv_blocks_ref(cache: torch.Tensor, layers: slice, heads: slice, blocks: torch.Tensor,
                         buf: torch.Tensor) -> None:
    """Scatter a packed ``buf`` into ``blocks`` of the (layers, heads) view of ``cache``."""
    cache[layers][:, :, :, :, heads].index_copy_(2, blocks, buf)
