"""Engine configuration: one small frozen dataclass per topic, checked at construction.

- `ModelConfig`: the architecture, read once from a Hugging Face config (v4 or v5 style):
  the Llama family, Qwen3 (per-head q/k RMSNorm) and the mixture-of-experts Qwen3-MoE and Mixtral.
- `CacheConfig`: paged KV cache size and block size, prefix caching.
- `SchedulerConfig`: per-step token budget, sequence cap, chunked prefill.
- `ParallelConfig`: a worker group's tp x pp layout (and expert parallelism over tp).

The engine derives everything else (number of blocks, max model length) from these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from splitserve.kernels.rotary import RopeSpec
from splitserve.mapping import Mapping

#: Architectures the model code implements (Hugging Face ``model_type``).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
#: Of those, the mixture-of-experts ones.
MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")


def check_supported(
    model_type: str | None, architectures: list[str] | None = None, where: str = ""
) -> None:
    """Raise ValueError unless ``model_type`` is one the engine implements."""
    if model_type in SUPPORTED_MODEL_TYPES:
        return
    archs = f" (architectures {architectures})" if architectures else ""
    place = f" in {where!r}" if where else ""
    raise ValueError(
        f"unsupported architecture: model_type {model_type!r}{archs}{place}; "
        f"splitserve supports model_type {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, dense or mixture-of-experts."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    tie_word_embeddings: bool
    #: Bias on q/k/v projections (Qwen2 always; Llama when ``attention_bias``).
    qkv_bias: bool = False
    #: Bias on the output projection (Llama ``attention_bias`` only).
    o_bias: bool = False
    #: Mistral-style sliding window attention; None means full attention.
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    #: Qwen3: RMSNorm over each query and key head (one weight of head_dim, shared by the
    #: heads) after the projections, before RoPE.
    qk_norm: bool = False
    #: Mixture of experts (0: dense). Routed experts, and how many each token uses.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    #: Each expert's gated-MLP width (``intermediate_size`` stays the dense layers' width).
    moe_intermediate_size: int = 0
    #: Divide the top-k routing probabilities by their sum (Mixtral always; Qwen3-MoE when
    #: ``norm_topk_prob``).
    norm_topk_prob: bool = True
    #: Qwen3-MoE: layer i is sparse when (i + 1) % decoder_sparse_step == 0 and i is not in
    #: ``mlp_only_layers`` (those keep a dense MLP of ``intermediate_size``).
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_supported(self.model_type)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} heads is not a multiple of {self.num_kv_heads} KV heads")
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok must be in [1, {self.num_experts}], "
                                 f"got {self.num_experts_per_tok}")
            if self.moe_intermediate_size < 1 or self.decoder_sparse_step < 1:
                raise ValueError("moe_intermediate_size and decoder_sparse_step must be >= 1")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global layer ``layer`` routes its tokens to experts (else a dense MLP)."""
        return (self.is_moe and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """Read a transformers config object (v4 ``rope_scaling`` or v5 ``rope_parameters``)."""
        model_type = getattr(hf, "model_type", None)
        check_supported(model_type, getattr(hf, "architectures", None))
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.rms_norm_eps),
            rope=_rope_spec(hf, head_dim),
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bias,
            # Llama and Qwen3 put ``attention_bias`` on o_proj too; Qwen2 never has one there.
            o_bias=bias and model_type in ("llama", "qwen3", "qwen3_moe"),
            sliding_window=_sliding_window(hf, model_type),
            eos_token_ids=_as_ids(getattr(hf, "eos_token_id", None)),
            bos_token_id=getattr(hf, "bos_token_id", None),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            **_moe_fields(hf, model_type),
        )


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _moe_fields(hf: Any, model_type: str) -> dict[str, Any]:
    if model_type == "mixtral":  # every layer sparse; the experts' width is ``intermediate_size``
        return dict(num_experts=int(hf.num_local_experts), num_experts_per_tok=int(hf.num_experts_per_tok),
                    moe_intermediate_size=int(hf.intermediate_size), norm_topk_prob=True)
    if model_type == "qwen3_moe":
        # transformers 5 calls it num_local_experts (num_experts is an alias); 4 only num_experts.
        experts = getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts", 0)
        return dict(num_experts=int(experts), num_experts_per_tok=int(hf.num_experts_per_tok),
                    moe_intermediate_size=int(hf.moe_intermediate_size),
                    norm_topk_prob=bool(getattr(hf, "norm_topk_prob", False)),
                    decoder_sparse_step=int(getattr(hf, "decoder_sparse_step", 1) or 1),
                    mlp_only_layers=tuple(int(i) for i in (getattr(hf, "mlp_only_layers", None) or ())))
    return {}


def _sliding_window(hf: Any, model_type: str) -> int | None:
    window = getattr(hf, "sliding_window", None)
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not getattr(hf, "use_sliding_window", False):
        return None
    if model_type == "qwen3" and window:
        # Qwen3 slides only in the layers from max_window_layers on; one window for all is wrong.
        raise ValueError("Qwen3 with use_sliding_window (a per-layer window) is not supported")
    return int(window) if window else None


def _rope_spec(hf: Any, head_dim: int) -> RopeSpec:
    # transformers v5 keeps theta and scaling together in `rope_parameters`; v4 splits them.
    params = dict(getattr(hf, "rope_parameters", None) or {})
    scaling = getattr(hf, "rope_scaling", None) or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return RopeSpec(head_dim=head_dim, theta=float(theta))
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: 'default', 'llama3'")
    return RopeSpec(
        head_dim=head_dim,
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position=int(params["original_max_position_embeddings"]),
    )


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size and how much memory it may take."""

    block_size: int = 16
    #: Exact number of KV blocks; overrides ``memory_bytes`` when set.
    num_blocks: int | None = None
    #: KV-cache memory budget in bytes (all layers, K and V) when ``num_blocks`` is None.
    memory_bytes: int = 2 * 1024**3
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.memory_bytes < 1:
            raise ValueError(f"KV memory budget must be positive, got {self.memory_bytes}")

    def resolve_num_blocks(self, bytes_per_token: int) -> int:
        """Blocks that fit the budget for a model using ``bytes_per_token`` of KV per token."""
        if self.num_blocks is not None:
            return self.num_blocks
        blocks = self.memory_bytes // (bytes_per_token * self.block_size)
        if blocks < 1:
            raise ValueError(
                f"KV memory budget {self.memory_bytes} B holds no block of "
                f"{self.block_size} tokens ({bytes_per_token} B per token)"
            )
        return blocks


@dataclass(frozen=True)
class ParallelConfig:
    """The layout of one worker group and the deadlines of its rank processes."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    #: A step that takes longer than this fails the group (a rank hung or died).
    step_timeout_s: float = 120.0
    #: Rank processes must start, rendezvous and load weights within this.
    startup_timeout_s: float = 300.0
    #: Mixture-of-experts models: each tp rank holds whole experts (num_experts / tp of them)
    #: instead of every expert's 1/tp slice; a token's expert outputs are computed on the
    #: ranks that own its experts and summed back by the tp all-reduce. Dense models ignore it.
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError(
                f"tensor/pipeline parallel sizes must be >= 1, got tp={self.tensor_parallel_size} "
                f"pp={self.pipeline_parallel_size}")
        if self.step_timeout_s <= 0 or self.startup_timeout_s <= 0:
            raise ValueError("worker-group timeouts must be positive")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def mapping(self, rank: int = 0) -> Mapping:
        """Rank ``rank``'s place in this layout (rank 0 holds the first pipeline stage)."""
        return Mapping(self.world_size, rank, self.tensor_parallel_size, self.pipeline_parallel_size)


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    #: Tokens computed per step over all sequences (decode tokens + prefill chunks).
    max_num_batched_tokens: int = 2048
    #: Sequences running at once.
    max_num_seqs: int = 256
    #: Split long prompts into chunks that fit the token budget; otherwise a prompt is
    #: scheduled only when it fits whole.
    enable_chunked_prefill: bool = True
    #: Schedule step n+1 while the device runs step n (pp = 1; tp > 1 ranks share each step's
    #: samples). None: on for one-rank groups on a CUDA device; the CPU computes in the
    #: scheduling thread anyway.
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
