"""The paged KV cache tensors of one worker: allocated once at start-up, reused forever.

One contiguous tensor ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``
(so a transfer can address any layer range or block set with views); the model reads it as
a list of per-layer `LayerKV` views. The block manager decides which blocks a sequence owns;
this module only holds the memory.

The cache's element type (``kv_dtype``) is the model's (``dtype``) unless the engine asks for
an FP8 cache (``kv_cache_dtype="fp8"``: ``torch.float8_e4m3fn``, half the bytes of bf16, so the
same budget holds twice the blocks). An FP8 cache stores ``value / scale`` and comes with its
scales: one float32 tensor ``[num_layers, 2 (K, V), num_kv_heads]`` per rank, owned here,
allocated with the cache (fixed memory: CUDA graphs capture its address) and filled once at
start-up, before the first step (`set_scales`; the rule is `workers/kv_scales.py`'s).
"""

from __future__ import annotations

import enum
import mmap
from dataclasses import dataclass

import torch

from splitserve.kernels.attention import LayerKV
from splitserve.mapping import Mapping
from splitserve.workers.config import ModelConfig

FP8_DTYPE = torch.float8_e4m3fn


class KVCacheDtype(enum.StrEnum):
    """The values of ``kv_cache_dtype`` (engine config, CLI, YAML); equal to their strings."""

    #: The model's dtype.
    AUTO = "auto"
    #: float8_e4m3fn with per-(layer, K/V, KV head) scales.
    FP8 = "fp8"


def check_kv_cache_dtype(name: str) -> KVCacheDtype:
    """``name`` as a `KVCacheDtype`; ValueError naming the choices otherwise (configs call it early)."""
    try:
        return KVCacheDtype(name)
    except ValueError:
        raise ValueError(f"unknown kv_cache_dtype {name!r}; choose one of {[d.value for d in KVCacheDtype]} "
                         "(fp8 = float8_e4m3fn, auto = the model's dtype)") from None


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for ``kv_cache_dtype`` ``name``."""
    return FP8_DTYPE if check_kv_cache_dtype(name) is KVCacheDtype.FP8 else model_dtype


@dataclass(frozen=True)
class KVCacheSpec:
    num_blocks: int
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    #: The model's dtype (activations, weights, attention math).
    dtype: torch.dtype
    #: The cache's element type; None: the model's (``kv_cache_dtype="auto"``).
    kv_dtype: torch.dtype | None = None

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.kv_dtype if self.kv_dtype is not None else self.dtype

    @property
    def quantized(self) -> bool:
        """The cache stores FP8 with per-(layer, K/V, head) scales."""
        return self.cache_dtype == FP8_DTYPE

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.cache_dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size

    @classmethod
    def for_rank(cls, cfg: ModelConfig, mapping: Mapping, num_blocks: int, block_size: int,
                 dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> "KVCacheSpec":
        """The share of one rank: its pipeline stage's layers and its tp rank's KV heads."""
        layers, kv_heads = mapping.pp_layers(cfg.num_layers), mapping.kv_heads(cfg.num_kv_heads)
        return cls(num_blocks, block_size, len(layers), len(kv_heads), cfg.head_dim, dtype,
                   None if kv_dtype == dtype else kv_dtype)


class KVCache:
    def __init__(self, spec: KVCacheSpec, device: torch.device):
        self.spec = spec
        shape = (spec.num_layers, 2, spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        # Zeroed, not empty: padded decode rows read unused slots (masked, but must not be NaN).
        if device.type == "cpu":
            # An anonymous mapping is zero-filled by the kernel and takes memory only where
            # blocks are written: a 2 GiB budget costs what the requests use, not 2 GiB up front
            # (torch.zeros would touch every page).
            self._mapping = mmap.mmap(-1, spec.num_blocks * spec.bytes_per_block)
            self.data = torch.frombuffer(self._mapping, dtype=torch.uint8).view(spec.cache_dtype).view(shape)
        else:
            self.data = torch.zeros(shape, dtype=spec.cache_dtype, device=device)
        #: FP8 only: [num_layers, 2, num_kv_heads] float32, dequantized = stored * scale.
        #: Starts at 1 and is set once before the first step; never reallocated. Each layer's
        #: K and V rows start 16 bytes apart or more (rows padded to 4 floats): Triton compiles
        #: a kernel per pointer alignment, and rows of 1 or 2 heads would alternate two.
        self.scales: torch.Tensor | None = None
        if spec.quantized:
            padded = -(-spec.num_kv_heads // 4) * 4
            self.scales = torch.ones(spec.num_layers, 2, padded, dtype=torch.float32,
                                     device=device)[:, :, :spec.num_kv_heads]

    def layers(self) -> list[LayerKV]:
        if self.scales is None:
            return [LayerKV(layer[0], layer[1]) for layer in self.data]
        return [LayerKV(layer[0], layer[1], scales[0], scales[1]) for layer, scales in zip(self.data, self.scales)]

    def set_scales(self, scales: torch.Tensor) -> None:
        """Fill the FP8 scales (in place: graphs and views keep pointing at the same memory)."""
        if self.scales is None:
            raise RuntimeError("this KV cache is not quantized: it has no scales")
        if tuple(scales.shape) != tuple(self.scales.shape) or not bool((scales > 0).all()):
            raise ValueError(f"KV scales must be positive, shape {tuple(self.scales.shape)}, "
                             f"got {tuple(scales.shape)}")
        self.scales.copy_(scales.to(torch.float32))

    @property
    def transfer_data(self) -> torch.Tensor:
        """The cache as the KV transfer service moves it: FP8 as its raw bytes (uint8, the
        same shape), since NCCL and gloo take no float8 dtype; any other dtype as it is."""
        return self.data.view(torch.uint8) if self.spec.quantized else self.data
