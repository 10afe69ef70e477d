"""The mixture-of-experts layer (Qwen3-MoE, Mixtral): a router and the experts' gated MLPs.

A step's tokens [T, H] go through the router (a replicated [E, H] linear; `kernels.route`: softmax,
top-k, the model's renormalisation), then through their k experts (`kernels.fused_moe`),
weighted and summed. Two ways to lay the experts over the tensor-parallel ranks:

- sharded (default): every rank holds every expert's 1/tp slice of the intermediate dimension,
  like the dense MLP: gate/up rows and down columns ``shard_range(I)``; each rank's partial
  sums are all-reduced.
- expert parallel (``ParallelState.expert_parallel``): rank r holds whole experts
  ``[r * E/tp, (r + 1) * E/tp)``. Every tp rank already has every token (activations are
  replicated after each all-reduce), so "sending a token to its expert's rank" is that rank
  computing it: each rank runs the (token, choice) pairs of its own experts, the others add
  nothing, and the same all-reduce combines the outputs back on every rank.

Either way the layer ends in one all-reduce, so pipeline parallelism and the KV layout are as
for dense models. Checkpoint tensors are per expert (``experts.{e}.gate_proj.weight`` ...,
the names on the hub and the names transformers' ``save_pretrained`` writes); `expert_shard`
maps one to its place in this rank's fused ``w13`` / ``w2`` (or, for FP8 experts, their
scales: ``weight_scale`` -> ``w13_scale`` / ``w2_scale``).

With a quantization config that does not ignore them, the experts are FP8 (e4m3;
`quant.Fp8ExpertsMethod` allocates, loads and restores them; the kernel runs them weight-only at
decode sizes, W8A8 at prefill sizes); the router stays float.
"""

from __future__ import annotations

import torch
from torch import nn

from splitserve.kernels import dispatch as kernels
from splitserve.kernels.moe import ExpertSlots, ExpertWeights
from splitserve.workers.config import ModelConfig
from splitserve.workers.models.layers import _copy_checked
from splitserve.workers.models.quant import SCALE_PARAM, experts_method
from splitserve.workers.parallel import ParallelState
from splitserve.workers.quant_config import QuantConfig

#: Per-expert projection -> (our fused parameter, which of its two row blocks).
_EXPERT_PROJ = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", 0)}
#: The checkpoint's per-expert parameter -> the suffix of ours.
_EXPERT_PARAM = {"weight": "", SCALE_PARAM: "_scale"}
#: An expert's gate, up and down projections as Qwen3-MoE and Mixtral checkpoints name them
#: (for a quantization config's ignore list, which uses the checkpoint's names).
_EXPERT_SPELLINGS = (("mlp", "gate_proj", "block_sparse_moe", "w1"), ("mlp", "up_proj", "block_sparse_moe", "w3"),
                     ("mlp", "down_proj", "block_sparse_moe", "w2"))


class Router(nn.Module):
    """The router (``gate``): logits x W^T [T, E] (the weight is replicated on every rank),
    routed by `kernels.router`."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (weights [T, k] float32, expert ids [T, k] int32)."""
        return kernels.router(x, self.weight, top_k, renormalize)

    def load_shard(self, param_name: str, shard: int, tensor) -> None:
        _copy_checked(self.weight.data, tensor[:], "router weight")


class FusedExperts(nn.Module):
    """This rank's experts: ``w13`` [E_local, 2 I_local, H] (gate | up), ``w2`` [E_local, H, I_local],
    float, or e4m3 with ``w13_scale`` / ``w2_scale`` (``quant``).

    Loader shards: w13's (and w13_scale's) shard ``2 * local_e + (0 gate | 1 up)``, w2's (and
    w2_scale's) shard ``local_e``."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelState, quant: QuantConfig | None = None,
                 prefix: str = ""):
        """``prefix``: the checkpoint's name of the layer (``model.layers.{i}``)."""
        super().__init__()
        m, tp = parallel.mapping, parallel.tp_size
        num_experts, inter, hidden = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        if parallel.expert_parallel and tp > 1:
            if num_experts % tp:
                raise ValueError(f"expert parallel: {num_experts} experts do not divide over tp {tp} ranks")
            self.experts = m.shard_range(num_experts)
            self.cols = range(inter)
        else:
            self.experts = range(num_experts)
            self.cols = m.shard_range(inter)
        n, i = len(self.experts), len(self.cols)
        self.quant = experts_method(quant, [
            (f"{prefix}.{qwen}.experts.{e}.{q}", f"{prefix}.{mixtral}.experts.{e}.{m}")
            for e in range(num_experts) for qwen, q, mixtral, m in _EXPERT_SPELLINGS])
        if self.quant is None:
            self.w13 = nn.Parameter(torch.empty(n, 2 * i, hidden))
            self.w2 = nn.Parameter(torch.empty(n, hidden, i))
            self.num_shards = {"w13": 2 * n, "w2": n}
        else:
            self.quant.check_alignment(f"{prefix} experts", self.cols, inter)
            self.quant.create_weights(self, n, i, hidden)
            self.num_shards = {"w13": 2 * n, "w2": n, "w13_scale": 2 * n, "w2_scale": n}

    def weights(self) -> ExpertWeights:
        if self.quant is not None:
            return self.quant.weights(self)
        return ExpertWeights(self.w13, self.w2)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                defer_combine: bool = False) -> torch.Tensor | ExpertSlots:
        return kernels.fused_moe(x, self.weights(), weights, ids, self.experts.start, defer_combine)

    def shard_of(self, expert: int, proj: str, param: str = "weight") -> tuple[str, int] | None:
        """Global ``expert``'s ``proj`` (gate_proj, up_proj, down_proj) ``param`` (weight, or
        weight_scale for FP8 experts) -> (our param, shard), or None when another rank holds
        that expert."""
        if expert not in self.experts:
            return None
        if param not in _EXPERT_PARAM:
            raise ValueError(f"expert {expert} {proj}: unexpected parameter {param!r}")
        base, half = _EXPERT_PROJ[proj]
        local = expert - self.experts.start
        return base + _EXPERT_PARAM[param], (2 * local + half if base == "w13" else local)

    def load_shard(self, param_name: str, shard: int, tensor) -> None:
        if self.quant is not None:
            self.quant.load(self, param_name, shard, tensor, self.cols)
            return
        i = len(self.cols)
        if param_name == "w13":
            local, half = divmod(shard, 2)
            dest = self.w13.data[local, half * i : (half + 1) * i]
            src = tensor[self.cols.start : self.cols.stop]
        else:
            dest = self.w2.data[shard]
            src = tensor[:, self.cols.start : self.cols.stop]
        _copy_checked(dest, src, f"{param_name}[{shard}]")


class SparseMoeBlock(nn.Module):
    """route -> experts -> all-reduce over tp (see the module docstring). With no tp peers the
    output on CUDA is the experts' unsummed `ExpertSlots`: the decoder's next residual add +
    RMSNorm sums them (`dispatch.add_rms_norm`), one launch fewer a layer."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelState, quant: QuantConfig | None = None,
                 prefix: str = ""):
        super().__init__()
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.parallel = parallel
        self.gate = Router(cfg.hidden_size, cfg.num_experts)
        self.experts = FusedExperts(cfg, parallel, quant, prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor | ExpertSlots:
        weights, ids = self.gate(x, self.top_k, self.renormalize)
        if self.parallel.tp_size == 1:
            return self.experts(x, weights, ids, defer_combine=True)
        return self.parallel.all_reduce(self.experts(x, weights, ids))


def expert_shard(rest: str, param: str, experts: FusedExperts) -> tuple[str, str, int] | None:
    """A layer-relative checkpoint module name ``mlp.experts.{e}.{proj}`` and its parameter ->
    (our module path in the layer, param, shard), or None when another rank holds expert e."""
    parts = rest.split(".")
    if len(parts) != 4 or not parts[2].isdigit() or parts[3] not in _EXPERT_PROJ:
        raise ValueError(f"unexpected expert tensor {rest!r}: expected per-expert names "
                         f"mlp.experts.<e>.{{gate_proj,up_proj,down_proj}}.weight")
    target = experts.shard_of(int(parts[2]), parts[3], param)
    return None if target is None else (f"{parts[0]}.experts", *target)


def random_expert_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """A sparse layer's checkpoint tensors (Qwen3-MoE names), layer-relative."""
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    shapes = {"mlp.gate.weight": (cfg.num_experts, h)}
    for e in range(cfg.num_experts):
        shapes |= {f"mlp.experts.{e}.gate_proj.weight": (i, h), f"mlp.experts.{e}.up_proj.weight": (i, h),
                   f"mlp.experts.{e}.down_proj.weight": (h, i)}
    return shapes
