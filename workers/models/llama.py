"""Llama-family decoder (Llama, Llama 3.x RoPE scaling, Mistral, Qwen2), our own code; the
base of Qwen3, Qwen3-MoE and Mixtral too (workers/models/qwen3.py, mixtral.py).

One class serves the family; the differences are configuration (`ModelConfig`): GQA head
counts, q/k/v bias (Qwen2), sliding window (Mistral), RoPE scaling (Llama 3), tied
embeddings, per-head q/k RMSNorm (Qwen3), and which layers route to experts instead of a
dense MLP (`SparseMoeBlock`, workers/models/moe.py). Projections that read the same input
are fused (q|k|v, gate|up) so a step makes fewer, larger matrix multiplies.

Parallelism comes from the rank's `ParallelState` (its `Mapping`): attention heads, KV heads
(replicated when there are fewer than tp ranks), the MLP and the vocabulary are split over
tensor-parallel ranks; each pipeline stage holds `mapping.pp_layers(num_layers)` and only the
first embeds, only the last normalises and computes logits.

With a `QuantConfig` (FP8 weights, workers/models/quant.py) the projections are FP8 linears,
except those the checkpoint's ``ignore`` list names; embeddings, LM head, norms and the MoE
router stay in the model's dtype.

Lifecycle: `build_model(cfg, parallel, ...)` allocates this rank's parameters, then either
`load_weights(named_tensors)` (Hugging Face names, lazily sliced) or `init_random(seed)`;
every step calls `forward(...)` on a flattened ragged batch and, on the last stage,
`compute_logits` on the rows that sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from splitserve.kernels import dispatch as kernels
from splitserve.kernels.attention import LayerKV
from splitserve.kernels.fp8 import Fp8Weight, QuantizedRows
from splitserve.kernels.moe import ExpertSlots
from splitserve.kernels.norm import QKNorm
from splitserve.kernels.rotary import rope_cos_sin
from splitserve.workers.config import ModelConfig
from splitserve.workers.models.attention import AttentionMetadata, PagedAttention
from splitserve.workers.models.layers import (
    ColumnParallelLinear, RowParallelLinear, ShardSpec, VocabParallelEmbedding,
)
from splitserve.workers.models.moe import SparseMoeBlock, expert_shard, random_expert_shapes
from splitserve.workers.models.quant import check_target, linear_method, prepare_checkpoint
from splitserve.workers.parallel import ParallelState
from splitserve.workers.quant_config import QuantConfig

#: One layer's cache views (`LayerKV`: k, v and an FP8 cache's scales; a plain pair works too).
KVCache = LayerKV | tuple[torch.Tensor, torch.Tensor]
#: Activations between pipeline stages: (hidden, residual).
Intermediate = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor | ExpertSlots, residual: torch.Tensor | None = None,
                quantize_for: Fp8Weight | None = None, gated: bool = False
                ) -> torch.Tensor | QuantizedRows | tuple[torch.Tensor | QuantizedRows, torch.Tensor]:
        """``x``: a tensor, or a MoE layer's unsummed expert slots (with ``residual``).
        ``quantize_for``: the FP8 weight the output feeds (``gated``: through the gated gate | up
        call); where that linear's path reads per-token e4m3 activations
        (`kernels.norm_quantizes_for`) the output comes quantized too (`QuantizedRows`), which
        saves the linear its own quantization launch. Returns the normed rows, and with
        ``residual`` the (normed, x + residual) pair."""
        quantize = kernels.norm_quantizes_for(x, quantize_for, gated)
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps, quantize)
        return kernels.add_rms_norm(x, residual, self.weight, self.eps, quantize)

    def load_shard(self, param_name: str, shard: int, tensor) -> None:
        self.weight.data.copy_(tensor[:])


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelState, quant: QuantConfig | None = None, prefix: str = ""):
        """``prefix``: the checkpoint's name of this module (``model.layers.{i}.self_attn``)."""
        super().__init__()
        m, d = parallel.mapping, cfg.head_dim
        heads, kv_heads = m.heads(cfg.num_heads), m.kv_heads(cfg.num_kv_heads)
        self.num_heads, self.num_kv_heads, self.head_dim = len(heads), len(kv_heads), d
        self.q_size, self.kv_size = len(heads) * d, len(kv_heads) * d
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, [
            ShardSpec(heads.start * d, self.q_size, 0),
            ShardSpec(kv_heads.start * d, self.kv_size, self.q_size),
            ShardSpec(kv_heads.start * d, self.kv_size, self.q_size + self.kv_size),
        ], bias=cfg.qkv_bias, quant=linear_method(quant, [f"{prefix}.{p}_proj" for p in "qkv"]))
        self.o_proj = RowParallelLinear(heads.start * d, self.q_size, cfg.hidden_size, cfg.o_bias, parallel,
                                        quant=linear_method(quant, [f"{prefix}.o_proj"]))
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d, cfg.sliding_window)
        if cfg.qk_norm:  # one head_dim weight shared by every head: replicated, not sharded
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor | QuantizedRows, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        layer = LayerKV(*kv_cache)
        # Qwen3 normalises each q and k head before RoPE: done by the rotary launch itself
        # (the modules only hold the weights), which saves the norms' own launches.
        qk_norm = (QKNorm(self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
                   if hasattr(self, "q_norm") else None)
        q, k = kernels.apply_rotary_and_write_kv(q, k, v, cos, sin, layer.k, layer.v, meta.slot_mapping,
                                                 layer.k_scale, layer.v_scale, qk_norm)
        out = self.attn(q, k, v, kv_cache, meta)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelState, quant: QuantConfig | None = None, prefix: str = ""):
        super().__init__()
        cols = parallel.mapping.shard_range(cfg.intermediate_size)
        n = len(cols)
        self.gate_up_proj = ColumnParallelLinear(
            cfg.hidden_size, [ShardSpec(cols.start, n, 0), ShardSpec(cols.start, n, n)], bias=False,
            quant=linear_method(quant, [f"{prefix}.gate_proj", f"{prefix}.up_proj"]))
        self.down_proj = RowParallelLinear(cols.start, n, cfg.hidden_size, False, parallel,
                                           quant=linear_method(quant, [f"{prefix}.down_proj"]))

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        """``x``: the normed rows, quantized per token already where the FP8 gate | up reads them so."""
        gate_up = self.gate_up_proj
        if gate_up.quant is not None:  # FP8: the SiLU rides in the linear's epilogue when it can
            return self.down_proj(gate_up.quant.apply_silu_and_mul(gate_up, x))
        return self.down_proj(kernels.silu_and_mul(gate_up(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelState, layer: int, quant: QuantConfig | None = None):
        """``layer``: the global layer index (whether it is sparse depends on it)."""
        super().__init__()
        prefix = f"model.layers.{layer}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, parallel, quant, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (SparseMoeBlock(cfg, parallel, quant, prefix) if cfg.is_moe_layer(layer)
                    else LlamaMLP(cfg, parallel, quant, f"{prefix}.mlp"))

    def forward(self, x: torch.Tensor | ExpertSlots, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
                ) -> tuple[torch.Tensor | ExpertSlots, torch.Tensor]:
        """``x``: the stream, or the layer before's MoE slots unsummed; returns this layer's
        output (a MoE layer's slots unsummed on the Triton path) and the residual."""
        # Each norm quantizes its output where the FP8 linear it feeds would (q|k|v, gate|up).
        attn_in = self.self_attn.qkv_proj.fp8_weight()
        if residual is None:
            residual, x = x, self.input_layernorm(x, quantize_for=attn_in)
        else:
            x, residual = self.input_layernorm(x, residual, quantize_for=attn_in)
        x = self.self_attn(x, cos, sin, kv_cache, meta)
        mlp_in = self.mlp.gate_up_proj.fp8_weight() if isinstance(self.mlp, LlamaMLP) else None
        x, residual = self.post_attention_layernorm(x, residual, quantize_for=mlp_in, gated=True)
        return self.mlp(x), residual


# Hugging Face projection name -> (our fused module, which logical shard of it).
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    #: Checkpoint name fragment -> ours, applied to layer-relative names before `_FUSED`
    #: (a family whose checkpoints name things differently sets it: Mixtral).
    checkpoint_renames: dict[str, str] = {}

    def __init__(self, cfg: ModelConfig, parallel: ParallelState, quant: QuantConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.parallel = parallel
        self.quant = quant
        m = parallel.mapping
        self.layer_range = m.pp_layers(cfg.num_layers)
        self.is_first, self.is_last = m.is_first_pp_rank, m.is_last_pp_rank
        # The last stage needs the embedding too when the LM head is tied to it.
        if self.is_first or (self.is_last and cfg.tie_word_embeddings):
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, parallel, i, quant) for i in self.layer_range)
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            if not cfg.tie_word_embeddings:
                self.lm_head = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def init_buffers(self, device: torch.device) -> None:
        """RoPE tables, float32 whatever the weights' dtype: positions need the precision."""
        cos, sin = rope_cos_sin(self.cfg.rope, self.cfg.max_position_embeddings)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata,
                intermediate: Intermediate | None = None,
                layer_hook: Callable[[int], None] | None = None) -> torch.Tensor | Intermediate:
        """Flattened batch [T] -> final hidden states (last stage) or (hidden, residual).
        ``layer_hook(l)`` runs after global layer ``l`` (KV streaming starts sends there)."""
        if self.is_first:
            x, residual = self.embed_tokens(input_ids), None
        else:
            x, residual = intermediate
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta)
            if layer_hook is not None:
                layer_hook(self.layer_range.start + index)
        if not self.is_last:  # a MoE layer's deferred slots summed: the next stage gets tensors
            return kernels.combined(x), residual
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head
        return head.logits(hidden)

    # ---- weights -------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Load this rank's shards from Hugging Face-named tensors (or lazy slices of them);
        tensors of other stages are skipped; every local parameter must be covered."""
        loaded: set[tuple[str, str, int]] = set()
        for hf_name, tensor in prepare_checkpoint(weights):
            target = self._locate(hf_name)
            if target is not None:
                path, param, shard = target
                module = self.get_submodule(path)
                check_target(module, hf_name, tensor)
                module.load_shard(param, shard, tensor)
                loaded.add(target)
        missing = sorted(self._expected_shards() - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors for this rank, e.g. {missing[:4]}")

    def _locate(self, hf_name: str) -> tuple[str, str, int] | None:
        """HF name -> (our module path, parameter, shard) on this rank, or None to skip."""
        name = hf_name.removeprefix("model.")
        module, _, param = name.rpartition(".")
        if "rotary_emb" in name or (module == "lm_head" and self.cfg.tie_word_embeddings):
            return None  # tied: embed_tokens.weight is the head
        if module.startswith("layers."):
            _, index, rest = module.split(".", 2)
            if int(index) not in self.layer_range:
                return None  # another pipeline stage's layer
            local = f"layers.{int(index) - self.layer_range.start}"
            for old, new in self.checkpoint_renames.items():
                rest = rest.replace(old, new)
            if ".experts." in f"{rest}.":
                target = expert_shard(rest, param, self.get_submodule(f"{local}.mlp.experts"))
                return None if target is None else (f"{local}.{target[0]}", target[1], target[2])
            parent, _, leaf = rest.rpartition(".")
            fused, shard = _FUSED.get(leaf, (leaf, 0))
            return ".".join(p for p in (local, parent, fused) if p), param, shard
        return (module, param, 0) if self._has(module) else None

    def _has(self, path: str) -> bool:
        try:
            self.get_submodule(path)
            return True
        except AttributeError:
            return False

    def _expected_shards(self) -> set[tuple[str, str, int]]:
        expected = set()
        for full_name, _ in self.named_parameters():
            path, _, param = full_name.rpartition(".")
            module = self.get_submodule(path)
            if isinstance(module, ColumnParallelLinear):
                n = len(module.shards)  # one per logical output: q, k, v or gate, up
            else:
                n = getattr(module, "num_shards", {}).get(param, 1)
            # FP8 scales computed from a float weight at load, rather than read (quant.py).
            derived = getattr(module, "derived_shards", set())
            expected.update((path, param, i) for i in range(n) if (param, i) not in derived)
        return expected

    @torch.no_grad()
    def init_random(self, seed: int) -> None:
        """Random weights (speed work, tests): N(0, 0.02), norms at 1. Drawn for the full
        tensor and sharded like a checkpoint, so every tp/pp layout gets the same model."""
        self.load_weights(random_hf_weights(self.cfg, seed, self.rope_cos.device))


def random_hf_weights(cfg: ModelConfig, seed: int, device: torch.device = torch.device("cpu")):
    """Hugging Face-named random tensors of the whole model, one at a time, seeded per name.

    Drawn on ``device`` (an 8B model's worth of normals is slow on a CPU), so a seed gives the
    same weights for every tp/pp layout on one device type, but CPU and CUDA weights differ."""
    import zlib

    d, h = cfg.head_dim, cfg.hidden_size
    shapes = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    layer = {
        "self_attn.q_proj.weight": (cfg.num_heads * d, h), "self_attn.k_proj.weight": (cfg.num_kv_heads * d, h),
        "self_attn.v_proj.weight": (cfg.num_kv_heads * d, h), "self_attn.o_proj.weight": (h, cfg.num_heads * d),
        "mlp.gate_proj.weight": (cfg.intermediate_size, h), "mlp.up_proj.weight": (cfg.intermediate_size, h),
        "mlp.down_proj.weight": (h, cfg.intermediate_size),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
    }
    if cfg.qkv_bias:
        layer |= {"self_attn.q_proj.bias": (cfg.num_heads * d,), "self_attn.k_proj.bias": (cfg.num_kv_heads * d,),
                  "self_attn.v_proj.bias": (cfg.num_kv_heads * d,)}
    if cfg.o_bias:
        layer["self_attn.o_proj.bias"] = (h,)
    if cfg.qk_norm:
        layer |= {"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}
    dense_mlp = {k: layer.pop(k) for k in list(layer) if k.startswith("mlp.")}
    for i in range(cfg.num_layers):
        mlp = random_expert_shapes(cfg) if cfg.is_moe_layer(i) else dense_mlp
        shapes |= {f"layers.{i}.{k}": v for k, v in (layer | mlp).items()}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            yield f"model.{name}", torch.ones(shape)
        elif name.endswith(".bias"):
            yield f"model.{name}", torch.zeros(shape)
        else:
            gen = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            weight = torch.empty(shape, device=device).normal_(0.0, 0.02, generator=gen)
            yield (name if name.startswith("lm_head") else f"model.{name}"), weight
