"""The attention layer over the paged KV cache, and the per-step metadata it reads.

Lifecycle per step: the model runner builds one `AttentionMetadata` for the whole flattened
batch (decode tokens first, then prefill chunks); every layer's `PagedAttention` writes its
new K/V into the cache slots, then attends: all decode rows in one batched call, each
prefill chunk on its own. The kernels live in `splitserve.kernels.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from splitserve.kernels import attention as ref


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
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hk, D] -> [T, Hq, D]."""
        k_cache, v_cache = kv_cache
        ref.write_kv_ref(k_cache, v_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.num_decode:
            out[: meta.num_decode] = ref.paged_decode_attention_ref(
                q[: meta.num_decode], k_cache, v_cache, meta.decode_block_tables,
                meta.decode_context_lens, self.scale, self.sliding_window,
            )
        for chunk in meta.prefills:
            rows = slice(chunk.start, chunk.start + chunk.num_tokens)
            out[rows] = ref.paged_prefill_attention_ref(
                q[rows], k_cache, v_cache, chunk.block_table, chunk.context_len,
                self.scale, self.sliding_window, k_new=k[rows], v_new=v[rows],
            )
        return out
