"""Which implementation runs each kernel: Triton on CUDA, the plain-torch reference elsewhere.

The engine calls these functions, never a ``*_ref`` or ``*_triton`` module directly, so this
is the one place the choice is made. Per call, from the tensor the work is on:

- ``SPLITSERVE_KERNELS=auto`` (default): Triton when the tensor is on CUDA and ``triton``
  imports, the reference otherwise. CPU runs never import Triton, and give exactly the
  reference's results (the CPU path *is* the reference).
- ``SPLITSERVE_KERNELS=torch``: the references everywhere (a baseline on GPU, or a fallback).
- ``SPLITSERVE_KERNELS=triton``: Triton everywhere; on CPU tensors that needs Triton's
  interpreter (``TRITON_INTERPRET=1`` before ``triton`` is imported): tests only.

The variable is read once, at the first call (`kernel_mode`; tests clear its cache).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Sequence
from functools import cache
from typing import Literal

import torch
import torch.nn.functional as F  # the router's logits above SKINNY_MAX_ROWS

from splitserve.kernels import activation as activation_ref
from splitserve.kernels import attention as attention_ref
from splitserve.kernels import fp8 as fp8_ref
from splitserve.kernels import kv_pack as kv_pack_ref
from splitserve.kernels import moe as moe_ref
from splitserve.kernels import norm as norm_ref
from splitserve.kernels import rotary as rotary_ref

KernelMode = Literal["auto", "torch", "triton"]
ENV_VAR = "SPLITSERVE_KERNELS"


@cache
def kernel_mode() -> KernelMode:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"{ENV_VAR}={mode!r}: expected 'auto', 'torch' or 'triton'")
    return mode  # type: ignore[return-value]


@cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    """Whether work on ``x`` runs the Triton kernels."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton does not import")
        return True
    return x.is_cuda and triton_available()


# ---- host -> device -----------------------------------------------------------------------


def upload(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A small host list as a tensor on ``device``, without waiting for its stream: a plain
    copy from pageable memory waits for everything queued there (a step still running, a
    transfer's compute), so on CUDA it goes through pinned memory, asynchronously."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


# ---- linear layers --------------------------------------------------------------------------

#: Up to this many rows the MoE router on CUDA is a Triton launch (`RouterPath`: the one-launch
#: router, or the skinny kernel's logits and `route_triton`); above it cuBLAS's logits. The
#: one-launch router takes up to 64 rows (`moe_route_triton.MAX_ROWS`); whether it pays past
#: 16 is for benchmarks/router_bench.py to say.
SKINNY_MAX_ROWS = 16


def _skinny(x: torch.Tensor) -> bool:
    return x.dim() == 2 and 0 < x.shape[0] <= SKINNY_MAX_ROWS and use_triton(x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a weight in x's dtype. A bf16 decode batch on CUDA
    (x [M <= 16, K]) takes the skinny Triton kernel where this GPU's tuned table measured it
    faster than cuBLAS at this matrix and row count (`linear_triton.bf16_skinny_config`: at one
    row, the matrices whose K cuBLAS splits into a second launch); everything else cuBLAS."""
    if (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and _skinny(x)):
        from splitserve.kernels import linear_triton

        cfg = linear_triton.bf16_skinny_config(weight.shape[0], weight.shape[1], x.shape[0],
                                               linear_triton.device_name(x.device))
        if cfg is not None:
            return linear_triton.skinny_linear(x, weight, bias, cfg)
    return F.linear(x, weight, bias)


# ---- attention ----------------------------------------------------------------------------


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                           sliding_window: int | None = None, out: torch.Tensor | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`paged_decode_attention_ref`'s call; the result is written into ``out`` if given.
    ``k_scale``/``v_scale`` [Hk]: the FP8 cache's scales (None: the cache is in q's dtype)."""
    if use_triton(q):
        from splitserve.kernels import attention_triton

        return attention_triton.paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, out=out,
            k_scale=k_scale, v_scale=v_scale)
    result = attention_ref.paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens,
                                                      scale, sliding_window, k_scale, v_scale)
    return result if out is None else out.copy_(result)


def warm_up_attention(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, scale: float,
                      sliding_window: int | None, dtype: torch.dtype | None = None,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Compile the Triton attention kernels' variants at start-up (nothing to do for torch);
    ``dtype``: the queries' (the model's) when the cache is FP8."""
    if use_triton(k_cache):
        from splitserve.kernels import attention_triton

        attention_triton.warm_up(k_cache, v_cache, num_heads, scale, sliding_window, dtype=dtype,
                                 k_scale=k_scale, v_scale=v_scale)


def warm_up_token_counts(max_tokens: int, top_k: int = 0) -> list[int]:
    """Step sizes (tokens) whose forwards, run once at start-up, compile every launch variant
    that a step of 1 to ``max_tokens`` tokens takes (``top_k``: the model's experts a token,
    0 for a dense model). Triton compiles a variant the first time it runs (about a second on
    an H200) and every request of that step waits for it; the decode CUDA graphs compile the
    batch buckets' variants, but a step with a prefill in it can have any size.

    A launch changes with the size where a tuned table or a shape changes (rows 1 / 16 / 64 of
    the skinny linears, `linear_triton.TUNED_ROWS`; the row padding, powers of two; the MoE
    call's pair bounds, `moe_triton.pair_bounds`, and its direct path up to
    `moe_triton.DIRECT_MAX_TOKENS`) and where Triton specializes an integer argument (1, or a
    multiple of 16: the skinny kernels' rows). So: every power of two and the size after it,
    each side of every MoE bound, and ``max_tokens``. The MoE kernels take their pair counts
    unspecialized (the block-scaled FP8 GEMM its rows too), so a bucket's sizes share one variant."""
    counts = {1, max_tokens}
    power = 1
    while power <= max_tokens:
        counts |= {power, power + 1}
        power *= 2
    if top_k:
        from splitserve.kernels import moe_triton

        for bound in moe_triton.pair_bounds():  # <= and >= bounds alike: the sizes either side
            counts |= {bound // top_k - 1, bound // top_k, bound // top_k + 1}
        counts |= {moe_triton.DIRECT_MAX_TOKENS, moe_triton.DIRECT_MAX_TOKENS + 1}
    return sorted(c for c in counts if 1 <= c <= max_tokens)


def ragged_prefill(chunks: Sequence):
    """A step's prefill chunks as one `RaggedPrefill` (device tensors) for the Triton kernel."""
    from splitserve.kernels import attention_triton

    return attention_triton.RaggedPrefill.from_chunks(chunks)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, chunks: Sequence, scale: float, sliding_window: int | None,
                      out: torch.Tensor, ragged: Callable[[], object] | None = None,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Every prefill chunk of a step. Chunk c (`PrefillChunk`-like: start, num_tokens,
    context_len, block_table) is rows ``c.start .. + c.num_tokens`` of q, k, v [T, H, D] and
    writes the same rows of ``out``; its K/V are already in the cache.

    The reference runs chunk by chunk; Triton runs them all in one launch, from
    ``ragged()`` (the step's `RaggedPrefill`, built once and shared by every layer) or
    built here. ``k_scale``/``v_scale``: an FP8 cache's scales, as for decode."""
    if use_triton(q):
        from splitserve.kernels import attention_triton

        batch = ragged() if ragged is not None else ragged_prefill(chunks)
        return attention_triton.paged_prefill_attention_ragged(
            q, k_cache, v_cache, batch, scale, sliding_window, k_new=k, v_new=v, out=out,
            k_scale=k_scale, v_scale=v_scale)
    for c in chunks:
        rows = slice(c.start, c.start + c.num_tokens)
        out[rows] = attention_ref.paged_prefill_attention_ref(
            q[rows], k_cache, v_cache, c.block_table, c.context_len, scale, sliding_window,
            k_new=k[rows], v_new=v[rows], k_scale=k_scale, v_scale=v_scale)
    return out


# ---- norm and rotary ----------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             quantize: bool = False) -> torch.Tensor | fp8_ref.QuantizedRows:
    """``quantize``: on CUDA the normed rows come with their per-token e4m3 quantization
    (`fp8.QuantizedRows`), for the FP8 linear they feed (`norm_quantizes_for`); the CPU path
    returns the tensor, which that linear quantizes itself."""
    if use_triton(x):
        from splitserve.kernels import norm_triton

        return norm_triton.rms_norm(x, weight, eps, quantize)
    return norm_ref.rms_norm_ref(x, weight, eps)


def add_rms_norm(x: torch.Tensor | moe_ref.ExpertSlots, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float, quantize: bool = False) -> tuple[torch.Tensor | fp8_ref.QuantizedRows, torch.Tensor]:
    """(norm(x + residual), x + residual). ``x`` may be a MoE layer's unsummed slots (only the
    Triton path makes them): their sum is the x. ``quantize``: as `rms_norm`."""
    if isinstance(x, moe_ref.ExpertSlots) or use_triton(x):
        from splitserve.kernels import norm_triton

        return norm_triton.add_rms_norm(x, residual, weight, eps, quantize)
    return norm_ref.add_rms_norm_ref(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2n] (gate | up) -> silu(gate) * up [T, n]."""
    if use_triton(x):
        from splitserve.kernels import activation_triton

        return activation_triton.silu_and_mul(x)
    return activation_ref.silu_and_mul_ref(x)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q):
        from splitserve.kernels import rotary_triton

        return rotary_triton.apply_rotary(q, k, cos, sin)
    return rotary_ref.apply_rotary_ref(q, k, cos, sin)


def apply_rotary_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                              v_scale: torch.Tensor | None = None,
                              qk_norm: norm_ref.QKNorm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary`, then the rotated k and v stored at their slots (`write_kv_ref`; FP8
    caches quantized with ``k_scale``/``v_scale`` [Hk]): one Triton launch on CUDA. With
    ``qk_norm`` (Qwen3) every q and k head is RMS-normalised before the rotation, in that same
    launch; the reference runs `qk_norm_ref`, `apply_rotary_ref` and `write_kv_ref` in turn."""
    if use_triton(q):
        from splitserve.kernels import rotary_triton

        return rotary_triton.apply_rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping,
                                                       k_scale, v_scale, qk_norm)
    if qk_norm is not None:
        q, k = norm_ref.qk_norm_ref(q, k, qk_norm)
    q, k = rotary_ref.apply_rotary_ref(q, k, cos, sin)
    attention_ref.write_kv_ref(k_cache, v_cache, k, v, slot_mapping, k_scale, v_scale)
    return q, k


# ---- mixture of experts -------------------------------------------------------------------


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's choice (`moe.route`): softmax in float32, top-k, renormalised if asked ->
    (weights [T, k] float32, expert ids [T, k] int32), highest first."""
    if use_triton(router_logits):
        from splitserve.kernels import moe_route_triton

        return moe_route_triton.route_triton(router_logits, top_k, renormalize)
    return moe_ref.route(router_logits, top_k, renormalize)


class RouterPath(enum.Enum):
    """How `router` computes a decode batch's routing on CUDA (at most SKINNY_MAX_ROWS rows)."""

    #: One launch: logits, softmax, top-k (`moe_route_triton.router_triton`). Slower on an H200
    #: (benchmarks/router_bench.py, 2026-12-03: 6.05 against 5.54 us at one row, 19.6 against
    #: 5.9 at 64: its last program's serial finish costs more than a launch), kept to compare.
    FUSED = "fused"
    #: Two: the skinny kernel's float32 partial sums (`linear_triton.skinny_partials`), then
    #: `route_triton`, which adds them. The default, from that measurement.
    SKINNY_THEN_ROUTE = "skinny_then_route"


def router(x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool,
           path: RouterPath = RouterPath.SKINNY_THEN_ROUTE) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` of the router logits ``x weight^T``. A decode batch's few rows on CUDA go through
    ``path`` (both round the float32 logits to x's dtype, as a GEMM in it would); more rows, or
    the reference: ``F.linear``, then `route`."""
    if _skinny(x):
        from splitserve.kernels import moe_route_triton

        if path is RouterPath.FUSED:
            return moe_route_triton.router_triton(x, weight, top_k, renormalize)
        from splitserve.kernels import linear_triton

        return moe_route_triton.route_triton(linear_triton.skinny_partials(x, weight), top_k, renormalize,
                                             logits_dtype=x.dtype)
    return route(F.linear(x, weight), top_k, renormalize)


def fused_moe(x: torch.Tensor, experts: moe_ref.ExpertWeights, weights: torch.Tensor, ids: torch.Tensor,
              expert_offset: int = 0, defer_combine: bool = False) -> torch.Tensor | moe_ref.ExpertSlots:
    """Each token through its top-k experts, weighted and summed (`moe.fused_moe_ref`):
    x [T, H], the rank's experts (float or FP8: `moe.ExpertWeights`), weights [T, k] float32,
    ids [T, k] int32 (global expert ids; those outside [expert_offset, expert_offset + E_local)
    skipped). FP8 experts: weight-only on the CPU; on CUDA weight-only at decode sizes and W8A8
    at prefill sizes (`moe_triton.W8A8_MIN_PAIRS`). ``defer_combine``: on CUDA the weighted
    slots come back unsummed (`moe.ExpertSlots`), for `add_rms_norm` to sum (one launch fewer);
    `combined` sums them where something else needs the tensor. The CPU path always sums."""
    if use_triton(x):
        from splitserve.kernels import moe_triton

        return moe_triton.fused_moe_triton(x, experts, weights, ids, expert_offset, defer_combine=defer_combine)
    return moe_ref.fused_moe_ref(x, experts, weights, ids, expert_offset)


def combined(x: torch.Tensor | moe_ref.ExpertSlots) -> torch.Tensor:
    """``x`` as a tensor: a MoE layer's deferred slots summed (`fused_moe`), a tensor as it is."""
    if isinstance(x, moe_ref.ExpertSlots):
        from splitserve.kernels import moe_triton

        return moe_triton.combine_slots(x)
    return x


# ---- FP8 weights ---------------------------------------------------------------------------

#: Up to this many rows (tokens) the FP8 linear runs the weight-only kernel: decode-sized
#: batches are bound by reading the weights, and it reads e4m3 without quantizing activations.
#: Above it the matmul is compute-bound and both operands go to the tensor cores in e4m3.
FP8_WEIGHT_ONLY_MAX_M = 16
#: Up to this many rows, per-row (channel / tensor) scales take the skinny kernel as W8A8.
FP8_SKINNY_W8A8_MAX_M = 64


class Fp8Path(enum.Enum):
    """The kernel an FP8 linear's rows take; `fp8_path` is the one place it is chosen."""

    #: CPU (or ``SPLITSERVE_KERNELS=torch``): `fp8_linear_ref`, activations quantized per token
    #: (per token and 128-group for block scales), float32 sums.
    REFERENCE = "reference"
    #: The skinny Triton kernel, activations as they are (e4m3 tiles widened in registers).
    SKINNY_WEIGHT_ONLY = "skinny_weight_only"
    #: The skinny kernel on per-token e4m3 activations (per-row weight scales only).
    SKINNY_W8A8 = "skinny_w8a8"
    #: The block-scaled W8A8 Triton GEMM (activations per token and 128-group).
    BLOCK_GEMM = "block_gemm"
    #: ``torch._scaled_mm`` on per-token activations, per-channel / per-tensor weight scales.
    SCALED_MM = "scaled_mm"

    @property
    def quantizes_per_token(self) -> bool:
        """Whether this path reads per-token e4m3 activations (the RMSNorm before may make them)."""
        return self in (Fp8Path.SKINNY_W8A8, Fp8Path.SCALED_MM)


def fp8_path(rows: int, weight: fp8_ref.Fp8Weight, on: torch.Tensor, gated: bool = False) -> Fp8Path | None:
    """The path for ``rows`` rows (tokens) of activations on ``on``'s device times ``weight``:

    - up to FP8_WEIGHT_ONLY_MAX_M rows: weight-only, the skinny kernel; on an H200 it beat
      bf16 cuBLAS and ``_scaled_mm`` up to 16 rows (benchmarks/decode_kernel_sweep.py --families
      fp8; `linear_triton.fp8_skinny_config`);
    - up to FP8_SKINNY_W8A8_MAX_M rows with per-row scales: the skinny kernel as W8A8, faster
      than ``_scaled_mm`` at 64 rows; or weight-only where the GPU's tuned table measured it
      faster than that (`linear_triton.weight_only_pays`), which also spares the activations'
      quantization;
    - more rows: the block GEMM for block scales, ``_scaled_mm`` otherwise.

    ``gated``: the path of gate | up with the SiLU in the skinny kernel's epilogue, or None
    where that launch is not one (more rows, a block that the up half would start inside) or
    does not pay (`linear_triton.gated_pays`): the caller then runs the plain path and the SiLU."""
    if not use_triton(on):
        return None if gated else Fp8Path.REFERENCE
    from splitserve.kernels import linear_triton

    n, k = weight.data.shape
    block = weight.block if weight.scheme is fp8_ref.Fp8Scheme.BLOCK else None
    device = linear_triton.device_name(on.device)
    # Past 16 rows W8A8, unless this GPU's tuned table measured weight-only faster at these rows.
    w8a8 = rows > FP8_WEIGHT_ONLY_MAX_M and not (
        block is None and rows <= FP8_SKINNY_W8A8_MAX_M and linear_triton.weight_only_pays(n, k, rows, gated, device))
    if not w8a8 and rows <= FP8_SKINNY_W8A8_MAX_M:
        path = Fp8Path.SKINNY_WEIGHT_ONLY
    elif rows <= FP8_SKINNY_W8A8_MAX_M and block is None:
        path = Fp8Path.SKINNY_W8A8
    else:
        path = Fp8Path.BLOCK_GEMM if block is not None else Fp8Path.SCALED_MM
    if gated and (path not in (Fp8Path.SKINNY_WEIGHT_ONLY, Fp8Path.SKINNY_W8A8)
                  or (block is not None and (n // 2) % block[0])  # up would start inside a scale block
                  or not linear_triton.gated_pays(n, k, rows, w8a8, device)):
        return None
    return path


def fp8_linear(x: torch.Tensor | fp8_ref.QuantizedRows, weight: fp8_ref.Fp8Weight,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) for an e4m3 weight, x [..., K] -> [..., N] in x.dtype, on the path
    `fp8_path` picks. ``x`` may come quantized already (`fp8.QuantizedRows`, from the RMSNorm
    before): the paths on per-token activations take its e4m3 rows, the others its ``x``."""
    rows = x if isinstance(x, fp8_ref.QuantizedRows) else None
    x = rows.x if rows is not None else x
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    path = fp8_path(x2.shape[0], weight, x)
    if path is Fp8Path.REFERENCE:
        return fp8_ref.fp8_linear_ref(x, weight, bias)
    if x2.shape[0] == 0:  # nothing to launch
        return x2.new_empty(0, weight.data.shape[0]).reshape(*lead, weight.data.shape[0])
    return _fp8_run(path, x2, weight, bias, False, rows).reshape(*lead, weight.data.shape[0])


def fp8_silu_and_mul_linear(x: torch.Tensor | fp8_ref.QuantizedRows, weight: fp8_ref.Fp8Weight) -> torch.Tensor:
    """``silu_and_mul(fp8_linear(x, weight))`` for W = gate | up (an MLP's first half): a
    decode batch's rows on CUDA in one launch (the skinny kernel's gated epilogue, which rounds
    where the two launches would) where `fp8_path` says it pays, otherwise the two calls.
    ``x`` as for `fp8_linear`."""
    rows = x if isinstance(x, fp8_ref.QuantizedRows) else None
    plain = rows.x if rows is not None else x
    lead, k = plain.shape[:-1], plain.shape[-1]
    x2 = plain.reshape(-1, k)
    path = fp8_path(x2.shape[0], weight, plain, gated=True) if x2.shape[0] else None
    if path is None:
        return silu_and_mul(fp8_linear(x, weight))
    return _fp8_run(path, x2, weight, None, True, rows).reshape(*lead, weight.data.shape[0] // 2)


def norm_quantizes_for(x: torch.Tensor | moe_ref.ExpertSlots, weight: fp8_ref.Fp8Weight | None,
                       gated: bool = False) -> bool:
    """Whether the RMSNorm whose output feeds the linear of ``weight`` (None: not FP8; ``gated``:
    through `fp8_silu_and_mul_linear`) should also quantize it per token: where that linear's
    path (`fp8_path`) reads per-token e4m3 activations and would launch the quantization itself."""
    if weight is None:
        return False
    on = x.slots if isinstance(x, moe_ref.ExpertSlots) else x
    rows = x.shape[0] if isinstance(x, moe_ref.ExpertSlots) else x.reshape(-1, x.shape[-1]).shape[0]
    if rows == 0:
        return False
    path = (fp8_path(rows, weight, on, gated=True) if gated else None) or fp8_path(rows, weight, on)
    return path.quantizes_per_token


def _per_token(rows: fp8_ref.QuantizedRows | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(e4m3 [M, K], scales [M, 1]) of rows quantized already, or None."""
    if rows is None:
        return None
    return rows.q.reshape(-1, rows.q.shape[-1]), rows.scale.reshape(-1, 1)


def _fp8_run(path: Fp8Path, x2: torch.Tensor, weight: fp8_ref.Fp8Weight, bias: torch.Tensor | None,
             gated: bool, rows: fp8_ref.QuantizedRows | None) -> torch.Tensor:
    """x2 [M > 0, K] through ``path``'s kernel (a GPU one); ``rows``: x2's per-token
    quantization, made already (the RMSNorm's), or None."""
    from splitserve.kernels import fp8_triton, linear_triton

    m, k = x2.shape
    n = weight.data.shape[0]
    block = weight.block if weight.scheme is fp8_ref.Fp8Scheme.BLOCK else None
    device = linear_triton.device_name(x2.device)
    if path is Fp8Path.SKINNY_WEIGHT_ONLY:
        cfg = linear_triton.fp8_skinny_config(n, k, linear_triton.sms(x2.device), block, rows=m, gated=gated,
                                              device=device)
        return linear_triton.skinny_linear(x2, weight.data, bias, cfg, scale=weight.scale, scale_block=block,
                                           gated=gated)
    if path is Fp8Path.SKINNY_W8A8:
        cfg = linear_triton.fp8_skinny_config(n, k, linear_triton.sms(x2.device), w8a8=True, rows=m, gated=gated,
                                              device=device)
        xq, xs = _per_token(rows) or fp8_triton.quantize_per_token(x2)
        return linear_triton.skinny_linear(xq, weight.data, bias, cfg, scale=weight.scale, x_scale=xs.view(-1),
                                           out_dtype=x2.dtype, gated=gated)
    if gated:
        raise ValueError(f"the gated FP8 launch is the skinny kernel's, not {path}")
    if path is Fp8Path.BLOCK_GEMM:
        y = fp8_triton.fp8_block_linear(x2, weight)
    elif path is Fp8Path.SCALED_MM:
        y = fp8_triton.fp8_scaled_mm_linear(x2, weight, _per_token(rows))
    else:
        raise ValueError(f"no GPU kernel for {path}")
    return y if bias is None else y + bias


# ---- KV transfer --------------------------------------------------------------------------


def pack_kv_blocks(cache: torch.Tensor, layers: slice, heads: slice, blocks: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(cache):
        from splitserve.kernels import kv_pack_triton

        return kv_pack_triton.pack_kv_blocks(cache, layers, heads, blocks, out)
    return kv_pack_ref.pack_kv_blocks_ref(cache, layers, heads, blocks, out)


def unpack_kv_blocks(cache: torch.Tensor, layers: slice, heads: slice, blocks: torch.Tensor,
                     buf: torch.Tensor) -> None:
    if use_triton(cache):
        from splitserve.kernels import kv_pack_triton

        kv_pack_triton.unpack_kv_blocks(cache, layers, heads, blocks, buf)
    else:
        kv_pack_ref.unpack_kv_blocks_ref(cache, layers, heads, blocks, buf)
