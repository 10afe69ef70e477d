"""Rotary position embedding (RoPE), plain torch: frequency tables and the rotation.

Lifecycle: the model builds one cos/sin table for every position up to its maximum length
at start-up (`rope_cos_sin`), then each forward indexes it by the tokens' absolute positions
(`apply_rotary_ref`). Positions are per token, so a batch may mix prompts, chunks and decode
steps freely. The "rotate half" (non-interleaved) convention is the Hugging Face one; the
frequencies are computed the same way in float32 so float32 runs match token for token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeSpec:
    """What defines a RoPE table."""

    head_dim: int
    theta: float
    #: "default" or "llama3" (Llama 3.1 frequency smoothing).
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "llama3"):
            raise ValueError(
                f"unsupported rope scaling type {self.rope_type!r}; supported: 'default', 'llama3'"
            )


def rope_inv_freq(spec: RopeSpec) -> torch.Tensor:
    """Inverse frequencies, float32, shape [head_dim // 2]."""
    exponents = torch.arange(0, spec.head_dim, 2, dtype=torch.int64).to(torch.float32)
    inv_freq = 1.0 / (spec.theta ** (exponents / spec.head_dim))
    if spec.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, spec)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended:
    # this is how Llama 3.1 stretches its context without retraining the short range.
    low_wavelen = spec.original_max_position / spec.low_freq_factor
    high_wavelen = spec.original_max_position / spec.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / spec.factor, inv_freq)
    smooth = (spec.original_max_position / wavelen - spec.low_freq_factor) / (
        spec.high_freq_factor - spec.low_freq_factor
    )
    blended = (1 - smooth) * scaled / spec.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(spec: RopeSpec, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, float32, shape [max_positions, head_dim]."""
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = positions[:, None] * rope_inv_freq(spec)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] by per-token cos/sin [T, D]."""
    cos = cos.to(q.dtype)[:, None, :]
    sin = sin.to(q.dtype)[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
