"""The attention layer over the paged KV cache, and the per-step metadata it reads.

Lifecycle per step: the model runner builds one `AttentionMetadata` for the whole flattened
batch (decode tokens first, then prefill chunks); every layer's `PagedAttention` writes its
new K/V into the cache slots, then attends: all decode rows in one batched call, each
prefill chunk on its own (the reference on CPU) or all chunks in one launch (Triton on
CUDA). `splitserve.kernels.dispatch` picks the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from splitserve.kernels import dispatch as kernels
from splitserve.kernels.attention import LayerKV


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence's prefill chunk inside the flattened batch."""

    #: First token of the chunk in the flattened batch.
    start: int
    #: Tokens in the chunk.
    num_tokens: int
    #: Tokens of context after this chunk (cached prefix + chunk).
    context_len: int
    #: The sequence's block ids, int64.
    block_table: torch.Tensor


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each token's K/V goes and what each query attends, for one step."""

    #: Flat cache slot (block * block_size + offset) of every token, int64 [T].
    slot_mapping: torch.Tensor
    #: The first ``num_decode`` tokens are single-token decode rows.
    num_decode: int
    #: Block tables of the decode rows, int64 [num_decode, max_blocks] (padded).
    decode_block_tables: torch.Tensor | None
    #: Context length of each decode row including its new token, int64 [num_decode].
    decode_context_lens: torch.Tensor | None
    prefills: tuple[PrefillChunk, ...]

    @cached_property
    def ragged_prefill(self):
        """The prefill chunks as device tensors for one Triton launch; built by the first
        layer that asks, then shared by the others (a frozen dataclass still caches this)."""
        return kernels.ragged_prefill(self.prefills)


class PagedAttention(nn.Module):
    """softmax(q k^T * scale) v over the cache of one layer; no weights of its own."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, ...],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hk, D] -> [T, Hq, D]; the new k/v are in the cache already
        (`kernels.apply_rotary_and_write_kv` put them there). ``kv_cache``: a `LayerKV` (or
        a plain (k_cache, v_cache) pair: no FP8 scales)."""
        layer = LayerKV(*kv_cache)
        out = torch.empty_like(q)
        if meta.num_decode:
            kernels.paged_decode_attention(
                q[: meta.num_decode], layer.k, layer.v, meta.decode_block_tables,
                meta.decode_context_lens, self.scale, self.sliding_window, out=out[: meta.num_decode],
                k_scale=layer.k_scale, v_scale=layer.v_scale,
            )
        if meta.prefills:
            kernels.prefill_attention(q, k, v, layer.k, layer.v, meta.prefills, self.scale, self.sliding_window,
                                      out, ragged=lambda: meta.ragged_prefill, k_scale=layer.k_scale,
                                      v_scale=layer.v_scale)
        return out
