"""RMSNorm and fused residual add + RMSNorm in Triton: the CUDA path beside `norm.py`.

One program per row. The rounding follows the reference step by step (the sum rounded to the
input dtype, normalised in float32, rounded to the input dtype, then scaled by the weight and
rounded to the output dtype), so bf16 results differ from it only where the float32 sums
land differently (summation order), by at most one unit in the last place.

Two launches of the decoder are folded into this one where they would touch the same rows:

- before: a MoE layer's combine. Its x may be the experts' unsummed `moe.ExpertSlots`, summed
  here in float32 and rounded as `moe_triton.combine_slots` would (a decoder layer with no tp
  peers; the sum is x).
- after: the per-token e4m3 quantization of the output for an FP8 linear's W8A8 path
  (``quantize``: `fp8.QuantizedRows`, the same bits `fp8_triton.quantize_per_token` gives),
  which the whole row in one program makes a reduction over registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels import pdl
from splitserve.kernels.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE, QuantizedRows
from splitserve.kernels.moe import ExpertSlots
from splitserve.kernels.pdl import gdc_launch_dependents, gdc_wait


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, ids_ptr, q_ptr, qs_ptr,
    stride_x, stride_res, stride_out, stride_sum, stride_q, n_cols, eps, expert_offset, num_local,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, TOP_K: tl.constexpr, QUANT: tl.constexpr,
    FMAX: tl.constexpr, MIN_SCALE: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # a linear after us may start loading its weights (`pdl.py`)
        gdc_launch_dependents()
    if PDL == 2:  # launched early ourselves: nothing before the kernel before is done
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    if TOP_K:  # x is a MoE call's slots: row's k of them summed as `moe_triton._combine_kernel` does
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            e = tl.load(ids_ptr + row * TOP_K + j) - expert_offset
            if (e >= 0) & (e < num_local):
                acc += tl.load(x_ptr + (row * TOP_K + j) * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        x = acc.to(x_ptr.dtype.element_ty)
    else:
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=ok)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, 0) / n_cols
    normed = (xf * tl.math.rsqrt(variance + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    out = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, out, mask=ok)
    if QUANT:  # the stored row quantized per token, as `fp8_triton._quant_rows_kernel` does it
        o = tl.where(ok, out.to(tl.float32), 0.0)
        scale = tl.maximum(tl.max(tl.abs(o), axis=0) / FMAX, MIN_SCALE)
        q = tl.minimum(tl.maximum(tl.math.div_rn(o, scale), -FMAX), FMAX)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(qs_ptr + row, scale)


def _rows(t: torch.Tensor) -> torch.Tensor:
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(x: torch.Tensor | ExpertSlots, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            quantize: bool = False):
    hidden = x.shape[-1]
    if isinstance(x, ExpertSlots):
        x2, ids, top_k, offset, num_local = _rows(x.slots), x.ids.contiguous(), x.ids.shape[1], x.expert_offset, x.num_local
        shape, device, rows = x.shape, x.slots.device, x.shape[0]
    else:
        x2, ids, top_k, offset, num_local = _rows(x), weight, 0, 0, 0  # ids: an unread placeholder
        shape, device, rows = x.shape, x.device, x2.shape[0]
    res2 = _rows(residual) if residual is not None else x2
    out = torch.empty(shape, dtype=torch.result_type(weight, x2), device=device)
    summed = torch.empty(shape, dtype=x.dtype, device=device) if residual is not None else out
    out2, sum2 = out.view(-1, hidden), summed.view(-1, hidden)
    q = torch.empty(out2.shape, dtype=FP8_DTYPE, device=device) if quantize else out2
    q_scale = torch.empty(rows, 1, dtype=torch.float32, device=device) if quantize else out2
    if rows:
        block = triton.next_power_of_2(hidden)
        mode = pdl.mode(device)
        _rms_norm_kernel[(rows,)](
            x2, res2, weight, out2, sum2, ids, q, q_scale,
            x2.stride(0), res2.stride(0), out2.stride(0), sum2.stride(0), q.stride(0), hidden, eps, offset,
            num_local, BLOCK=block, HAS_RESIDUAL=residual is not None, TOP_K=top_k, QUANT=quantize, FMAX=FP8_MAX,
            MIN_SCALE=MIN_SCALE, PDL=mode, **pdl.launch_kwargs(mode == 2),
            num_warps=min(16, max(1, block // 256)),
        )
    if quantize:
        return QuantizedRows(out, q.view(out.shape[:-1] + (hidden,)), q_scale), summed
    return out, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool = False) -> torch.Tensor | QuantizedRows:
    """y = weight * x / sqrt(mean(x^2) + eps), as `rms_norm_ref`; ``quantize``: with y's
    per-token e4m3 quantization (`QuantizedRows`, for an FP8 linear's W8A8 path)."""
    return _launch(x, None, weight, eps, quantize)[0]


def add_rms_norm(
    x: torch.Tensor | ExpertSlots, residual: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool = False
) -> tuple[torch.Tensor | QuantizedRows, torch.Tensor]:
    """Fused residual add + RMSNorm, as `add_rms_norm_ref`: returns (norm(x + residual),
    x + residual) in new tensors; the inputs are left untouched. ``x`` may be a MoE call's
    unsummed `ExpertSlots`: summed here first, rounded as `moe_triton.combine_slots` rounds.
    ``quantize``: the normed rows come with their per-token e4m3 quantization, as `rms_norm`."""
    if residual.dtype != x.dtype or residual.shape != x.shape:
        raise ValueError(f"residual {residual.dtype} {tuple(residual.shape)} does not match x {x.dtype} {tuple(x.shape)}")
    return _launch(x, residual, weight, eps, quantize)
