"""Mixtral: the Llama-family decoder with a `SparseMoeBlock` in every layer.

Routing always renormalises the top-k probabilities (``ModelConfig.norm_topk_prob`` is set
by `ModelConfig.from_hf`); the experts' width is the config's ``intermediate_size``. Only the
checkpoint names differ from Qwen3-MoE's: ``block_sparse_moe.gate`` is the router and
``block_sparse_moe.experts.{e}.w1/w3/w2`` are gate/up/down, renamed on load.
"""

from __future__ import annotations

from splitserve.workers.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral 8x7B, 8x22B."""

    checkpoint_renames = {"block_sparse_moe.": "mlp.", ".w1": ".gate_proj", ".w3": ".up_proj", ".w2": ".down_proj"}
