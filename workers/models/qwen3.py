"""Qwen3 and Qwen3-MoE: the Llama-family decoder with per-head q/k RMSNorm (``qk_norm``).

Qwen3-MoE's sparse layers (every ``decoder_sparse_step``-th, minus ``mlp_only_layers``) are
`SparseMoeBlock`s: softmax top-k routing, renormalised when ``norm_topk_prob``. Checkpoint
names are Llama's plus ``self_attn.{q,k}_norm.weight`` and, in sparse layers,
``mlp.gate.weight`` and ``mlp.experts.{e}.{gate,up,down}_proj.weight``, which the shared
loader reads as they are. Everything else (lifecycle, parallelism) is `LlamaForCausalLM`'s.
"""

from __future__ import annotations

from splitserve.workers.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Dense Qwen3 (Qwen3-0.6B .. 32B)."""


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    """Qwen3-MoE (Qwen3-30B-A3B: 128 experts, 8 per token; Qwen3-235B-A22B)."""
