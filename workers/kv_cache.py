"""The paged KV cache tensors of one worker: allocated once at start-up, reused forever.

One contiguous tensor ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``
(so a transfer can address any layer range or block set with views); the model reads it as
a list of per-layer ``(k_cache, v_cache)`` views. The block manager decides which blocks a
sequence owns; this module only holds the memory.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import torch

from splitserve.mapping import Mapping
from splitserve.workers.config import ModelConfig


@dataclass(frozen=True)
class KVCacheSpec:
    num_blocks: int
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size

    @classmethod
    def for_rank(cls, cfg: ModelConfig, mapping: Mapping, num_blocks: int, block_size: int,
                 dtype: torch.dtype) -> "KVCacheSpec":
        """The share of one rank: its pipeline stage's layers and its tp rank's KV heads."""
        layers, kv_heads = mapping.pp_layers(cfg.num_layers), mapping.kv_heads(cfg.num_kv_heads)
        return cls(num_blocks, block_size, len(layers), len(kv_heads), cfg.head_dim, dtype)


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
            self.data = torch.frombuffer(self._mapping, dtype=spec.dtype).view(shape)
        else:
            self.data = torch.zeros(shape, dtype=spec.dtype, device=device)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer[0], layer[1]) for layer in self.data]
