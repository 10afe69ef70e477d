"""SiLU-and-multiply (the gated MLP's activation), plain torch: the CPU path and the oracle
for the Triton kernel. ``x`` [T, 2n] holds gate | up side by side (the fused projection's
output); the result is silu(gate) * up [T, n], each op rounded to the input dtype as
transformers' `LlamaMLP` does."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
