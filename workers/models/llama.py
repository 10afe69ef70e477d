"""Llama-family decoder (Llama, Llama 3.x RoPE scaling, Mistral, Qwen2), our own code.

One class serves the family; the differences are configuration (`ModelConfig`): GQA head
counts, q/k/v bias (Qwen2), sliding window (Mistral), RoPE scaling (Llama 3), tied
embeddings. Projections that read the same input are fused (q|k|v, gate|up) so a step makes
fewer, larger matrix multiplies; `load_weights` maps Hugging Face tensor names onto the fused
parameters shard by shard.

Lifecycle: `build_model(cfg)` allocates parameters (on the target device/dtype), then either
`load_weights(iter_of_named_tensors)` or `init_random(seed)`; every step calls
`forward(input_ids, positions, kv_caches, meta)` on a flattened ragged batch and
`compute_logits` on the rows that sample.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
import torch.nn.functional as F

from splitserve.kernels.norm import add_rms_norm_ref, rms_norm_ref
from splitserve.kernels.rotary import apply_rotary_ref, rope_cos_sin
from splitserve.workers.config import ModelConfig
from splitserve.workers.models.attention import AttentionMetadata, PagedAttention

KVCache = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm_ref(x, self.weight, self.eps)
        return add_rms_norm_ref(x, residual, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.sliding_window)

    def forward(self, x, cos, sin, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary_ref(q, k, cos, sin)
        out = self.attn(q, k, v, kv_cache, meta)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, residual, cos, sin, kv_cache, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


# Hugging Face name fragment -> (our fused parameter, which shard of it).
_FUSED_SHARDS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def init_buffers(self, device: torch.device) -> None:
        """RoPE tables, float32 whatever the weights' dtype: positions need the precision."""
        cos, sin = rope_cos_sin(self.cfg.rope, self.cfg.max_position_embeddings)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata):
        """Flattened batch: input_ids, positions [T] -> final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    # ---- weights -------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in; every parameter must be covered once."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            target = self._map_name(hf_name)
            if target is None:
                continue
            name, shard = target
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in the model ({name!r})")
            self._copy_shard(params[name], name, shard, tensor)
            loaded.add(name if shard is None else f"{name}#{shard}")
        self._check_complete(params, loaded)

    def _map_name(self, hf_name: str) -> tuple[str, int | None] | None:
        name = hf_name.removeprefix("model.")
        if "rotary_emb" in name:
            return None
        if name == "lm_head.weight" and self.lm_head is None:
            return None  # tied: the embedding serves as the head
        for part, (fused, shard) in _FUSED_SHARDS.items():
            if f".{part}." in name:
                return name.replace(f".{part}.", f".{fused}."), shard
        return name, None

    def _copy_shard(self, param: nn.Parameter, name: str, shard: int | None, tensor: torch.Tensor) -> None:
        if shard is None:
            dest = param.data
        else:
            dest = param.data.narrow(0, *self._shard_range(name, shard))
        if dest.shape != tensor.shape:
            raise ValueError(f"shape mismatch for {name} shard {shard}: model {tuple(dest.shape)}, checkpoint {tuple(tensor.shape)}")
        dest.copy_(tensor)

    def _shard_range(self, name: str, shard: int) -> tuple[int, int]:
        cfg = self.cfg
        if ".qkv_proj." in name:
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            return ((0, q), (q, kv), (q + kv, kv))[shard]
        return (shard * cfg.intermediate_size, cfg.intermediate_size)

    def _check_complete(self, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
        expected = set()
        for name in params:
            if ".qkv_proj." in name:
                expected.update(f"{name}#{i}" for i in range(3))
            elif ".gate_up_proj." in name:
                expected.update(f"{name}#{i}" for i in range(2))
            else:
                expected.add(name)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")

    @torch.no_grad()
    def init_random(self, seed: int) -> None:
        """Random weights of the right shape (speed work, tests): N(0, 0.02), norms at 1."""
        gen = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                cpu = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
                param.copy_(cpu)
