"""FP8 (e4m3) weights: quantize, dequantize, and the linear they compute, in plain torch.

This is the CPU path of `dispatch.fp8_linear` and the oracle of the Triton kernels
(kernels/fp8_triton.py). Lifecycle of a weight: a checkpoint gives (or `quantize` makes) an
`Fp8Weight` once, at load: e4m3 values ``data`` [N, K] and float32 ``scale`` with
``data.float() * scale == weight`` (scales broadcast as the scheme says). Every forward then
quantizes its activations dynamically (one scale per token, or per token and 128-column group
for the block scheme) and multiplies.

Scales are *multipliers* (dequantize = value * scale), whatever the checkpoint called them
(``weight_scale_inv`` of the block format is one too). Shapes, by `Fp8Scheme`:

- TENSOR: ``scale`` [1]: one for the whole tensor.
- CHANNEL: ``scale`` [N, 1]: one per output row.
- BLOCK: ``scale`` [ceil(N / bn), ceil(K / bk)] for ``block`` (bn, bk), 128x128 in published
  checkpoints (DeepSeek-V3, Qwen3-FP8); the last block row/column may be partial.

`fp8_linear_ref` computes what the W8A8 GPU paths compute (torch._scaled_mm, the block W8A8
kernel): both operands quantized, products of the dequantized values summed in float32. The
small-M GPU path quantizes only the weights (`fp8_weight_only_ref` is its oracle).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite e4m3fn value.
FP8_MAX = 448.0
#: The block of the block scheme, and the activation group of the block W8A8 path.
BLOCK = 128
#: Smallest scale: an all-zero row/block quantizes to zeros instead of dividing by zero.
MIN_SCALE = 1e-12


class Fp8Scheme(enum.Enum):
    """How many weight values share one scale."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    BLOCK = "block"


@dataclass(frozen=True)
class Fp8Weight:
    """An e4m3 weight [N, K] and its float32 scales (shapes in the module docstring)."""

    data: torch.Tensor
    scale: torch.Tensor
    scheme: Fp8Scheme
    #: (rows, cols) of one scale's block; BLOCK only.
    block: tuple[int, int] = (BLOCK, BLOCK)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Clamped first: values just past 448 after the division would become NaN in e4m3fn.
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _amax_scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax.float() / FP8_MAX).clamp(min=MIN_SCALE)


def quantize(weight: torch.Tensor, scheme: Fp8Scheme, block: tuple[int, int] = (BLOCK, BLOCK)) -> Fp8Weight:
    """A float weight [N, K] as an `Fp8Weight` of ``scheme`` (amax scaling, round to nearest)."""
    w = weight.float()
    n, k = w.shape
    if scheme is Fp8Scheme.TENSOR:
        scale = _amax_scale(w.abs().amax()).reshape(1)
        return Fp8Weight(_to_fp8(w, scale), scale, scheme)
    if scheme is Fp8Scheme.CHANNEL:
        scale = _amax_scale(w.abs().amax(dim=1, keepdim=True))
        return Fp8Weight(_to_fp8(w, scale), scale, scheme)
    bn, bk = block
    amax = _pad_to_blocks(w.abs(), bn, bk).amax(dim=(1, 3))  # [N/bn, K/bk]
    scale = _amax_scale(amax)
    return Fp8Weight(_to_fp8(w, expand_block_scale(scale, n, k, block)), scale, scheme, block)


def dequantize(weight: Fp8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``data * scale`` as ``dtype`` (computed in float32)."""
    n, k = weight.shape
    scale = weight.scale
    if weight.scheme is Fp8Scheme.BLOCK:
        scale = expand_block_scale(scale, n, k, weight.block)
    return (weight.data.float() * scale).to(dtype)


def expand_block_scale(scale: torch.Tensor, n: int, k: int, block: tuple[int, int]) -> torch.Tensor:
    """Block scales [ceil(n/bn), ceil(k/bk)] -> one per element [n, k]."""
    bn, bk = block
    return scale.repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]


def _pad_to_blocks(x: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """[n, k] -> [n/bn, bn, k/bk, bk], zero-padded (zeros never raise an amax)."""
    n, k = x.shape
    pn, pk = -n % bn, -k % bk
    x = torch.nn.functional.pad(x, (0, pk, 0, pn))
    return x.reshape((n + pn) // bn, bn, (k + pk) // bk, bk)


# ---- activations (dynamic, per forward) -------------------------------------------------------


@dataclass(frozen=True)
class QuantizedRows:
    """Activations [M, K] in the model's dtype (``x``) with their per-token e4m3 quantization
    (``q`` [M, K], ``scale`` float32 [M, 1]: `quantize_per_token`'s values), made together by
    the RMSNorm before an FP8 linear (`dispatch.add_rms_norm` with ``quantize``) so that the
    linear's W8A8 path skips its own quantization launch; its other paths read ``x``."""

    x: torch.Tensor
    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, 1]): one scale per row (token)."""
    scale = _amax_scale(x.abs().amax(dim=-1, keepdim=True))
    return _to_fp8(x.float(), scale), scale


def quantize_per_token_group(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, ceil(K/group)]): one scale per row and
    ``group`` consecutive columns, matching the weight's column blocks."""
    m, k = x.shape
    grouped = _pad_to_blocks(x.float(), 1, group).reshape(m, -(-k // group), group)  # [M, K/g, g]
    scale = _amax_scale(grouped.abs().amax(dim=-1))
    q = _to_fp8(x.float(), scale.repeat_interleave(group, dim=1)[:, :k])
    return q, scale


def dequantize_per_token_group(q: torch.Tensor, scale: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    return q.float() * scale.repeat_interleave(group, dim=1)[:, : q.shape[1]]


# ---- the linear ------------------------------------------------------------------------------


def fp8_linear_ref(x: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = quant(x) W^T (+ bias) with x quantized the way the W8A8 GPU paths do it (per token;
    per token and group for BLOCK), summed in float32 from the dequantized values; x.dtype out.
    x [..., K] -> [..., N]."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if weight.scheme is Fp8Scheme.BLOCK:
        xq, xs = quantize_per_token_group(x2, weight.block[1])
        xd = dequantize_per_token_group(xq, xs, weight.block[1])
    else:
        xq, xs = quantize_per_token(x2)
        xd = xq.float() * xs
    y = xd @ dequantize(weight).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, weight.data.shape[0])


def fp8_weight_only_ref(x: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x dequant(W)^T (+ bias): activations as they are, float32 sums; x.dtype out. The
    oracle of the small-M (decode) GPU kernel, which reads the e4m3 weight and scales it."""
    lead, k = x.shape[:-1], x.shape[-1]
    y = x.reshape(-1, k).float() @ dequantize(weight).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, weight.data.shape[0])
