"""Attention over a paged KV cache, plain torch: the CPU path and the oracle for Triton.

Cache layout (one tensor per layer and per K/V): ``[num_blocks, block_size, num_kv_heads,
head_dim]``. A sequence's context is the concatenation of its blocks, listed in its block
table; token ``i`` of a sequence lives at slot ``block_table[i // bs] * bs + i % bs``.

Per forward step the model (1) writes the new tokens' K/V into their slots
(`write_kv_ref`), then (2) attends: single-token decode rows together in one batched call
(`paged_decode_attention_ref`), each prefill chunk on its own (`paged_prefill_attention_ref`)
over its cached prefix plus itself, causally. GQA is handled by SDPA's ``enable_gqa`` so K/V
are never repeated. ``sliding_window`` (Mistral) keeps key j for query i when
``i - j < sliding_window``, the same convention as Hugging Face.

FP8 cache (``torch.float8_e4m3fn``, `workers/kv_cache.py`): with per-KV-head float32 scales
``k_scale``/``v_scale`` [Hk], a write stores ``clamp(value / scale, -448, 448)`` cast to e4m3
(`quantize_fp8`), and a read gives ``float32(stored) * scale`` cast to the query's dtype
(`dequantize_fp8`). A prefill chunk with no cached prefix attends its own new K/V rows as
computed, not their FP8 copies (as the Triton kernel does): every later read, decode and
chunks over a cached prefix, goes through the cache. Without scales nothing changes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

#: Largest finite float8_e4m3fn magnitude: values are clamped to it before the cast (the
#: cast itself turns anything larger into NaN).
FP8_MAX = 448.0


class LayerKV(NamedTuple):
    """One layer's cache views, as the model's attention reads them."""

    k: torch.Tensor
    v: torch.Tensor
    #: FP8 caches: float32 [num_kv_heads] (stored = value / scale); None otherwise.
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [..., Hk, D] -> ``dtype`` (float8_e4m3fn): x / scale [Hk] per head, saturated."""
    return (x.to(torch.float32) / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def dequantize_fp8(x: torch.Tensor, scale: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Stored FP8 x with its heads on dimension ``head_dim`` -> ``dtype``: float32(x) * scale."""
    shape = [1] * x.dim()
    shape[head_dim] = scale.numel()
    return (x.to(torch.float32) * scale.view(shape)).to(dtype)


def write_kv_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Store k, v [T, Hk, D] at the flat slots ``slot_mapping`` [T] (int64); quantized to the
    cache's FP8 with ``k_scale``/``v_scale`` [Hk] when given."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    if k_scale is not None:
        # Copied as bytes: torch has no CPU index_copy_ for float8.
        k = quantize_fp8(k, k_scale, k_cache.dtype).view(torch.uint8)
        v = quantize_fp8(v, v_scale, v_cache.dtype).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_kv_ref(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[B, M] block tables -> [B, Hk, M * block_size, D] contiguous context."""
    batch, max_blocks = block_tables.shape
    _, block_size, num_kv_heads, head_dim = cache.shape
    if cache.dtype == torch.float8_e4m3fn:  # gathered as bytes (float8 indexing is not everywhere)
        gathered = cache.view(torch.uint8)[block_tables].view(cache.dtype)
    else:
        gathered = cache[block_tables]
    gathered = gathered.view(batch, max_blocks * block_size, num_kv_heads, head_dim)
    return gathered.transpose(1, 2)


def _window_mask(
    q_pos: torch.Tensor, kv_pos: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """Boolean [..., Tq, L]: True where the query may attend the key (causal + window)."""
    allowed = kv_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)
    if sliding_window is not None:
        allowed &= (q_pos.unsqueeze(-1) - kv_pos.unsqueeze(-2)) < sliding_window
    return allowed


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per row. q [B, Hq, D]; context_lens [B] include the new token. FP8
    caches are dequantized with ``k_scale``/``v_scale`` [Hk]."""
    k = gather_kv_ref(k_cache, block_tables)
    v = gather_kv_ref(v_cache, block_tables)
    if k_scale is not None:  # [B, Hk, L, D]: heads on dimension 1
        k, v = dequantize_fp8(k, k_scale, 1, q.dtype), dequantize_fp8(v, v_scale, 1, q.dtype)
    kv_pos = torch.arange(k.shape[2], device=q.device)
    q_pos = (context_lens - 1).unsqueeze(-1)  # [B, 1]
    mask = _window_mask(q_pos, kv_pos.expand(q.shape[0], -1), sliding_window)  # [B, 1, L]
    # Causality alone masks the padding: every padded slot sits after the query position.
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=True
    )
    return out.squeeze(2)


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
    sliding_window: int | None = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of one chunk q [Tq, Hq, D], the last Tq tokens of ``context_len``.

    When the chunk is the whole context (no cached prefix) and ``k_new``/``v_new`` [Tq, Hk, D]
    are given, they are used directly instead of reading the cache back. FP8 caches are
    dequantized with ``k_scale``/``v_scale`` [Hk].
    """
    num_q = q.shape[0]
    prefix_len = context_len - num_q
    if prefix_len == 0 and k_new is not None and v_new is not None:
        k, v = k_new.transpose(0, 1), v_new.transpose(0, 1)
    else:
        num_blocks = -(-context_len // k_cache.shape[1])
        table = block_table[:num_blocks].unsqueeze(0)
        k = gather_kv_ref(k_cache, table)[0, :, :context_len]
        v = gather_kv_ref(v_cache, table)[0, :, :context_len]
        if k_scale is not None:  # [Hk, L, D]: heads on dimension 0
            k, v = dequantize_fp8(k, k_scale, 0, q.dtype), dequantize_fp8(v, v_scale, 0, q.dtype)
    qh = q.transpose(0, 1)
    if prefix_len == 0 and sliding_window is None:
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        q_pos = torch.arange(prefix_len, context_len, device=q.device)
        kv_pos = torch.arange(context_len, device=q.device)
        mask = _window_mask(q_pos, kv_pos, sliding_window)
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)
