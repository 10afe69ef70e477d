"""FP8 weights in the model: how a column/row-parallel linear holds, loads and runs them.

Lifecycle: `build_model` gives the model a `QuantConfig` (workers/quant_config.py); each
decoder layer asks `linear_method(config, hf_names)` for its projections (None for modules the
checkpoint left unquantized: its ``ignore`` list) and the linears call the `Fp8LinearMethod`
to allocate ``weight`` as float8_e4m3fn [N, K] and ``weight_scale`` float32 (per output row
[N, 1]; or 128x128 blocks [ceil(N/128), ceil(K/128)]). ``model.to(dtype)`` would widen
them like every other float parameter, so `restore_quantized_dtypes` puts them back right
after. Loading goes through `prepare_checkpoint` (scale names unified) then each linear's
`load_shard`, which lands here (`load_column` / `load_row`):
e4m3 tensors are copied as they are with their scales; float tensors (an unquantized
checkpoint with ``quantization="fp8"``, or random weights) are quantized on the spot, per output
row of this rank's slice, and their scale counts as loaded (``derived_shards``). Every forward
is `kernels.fp8_linear` (kernels/dispatch.py picks the path).

Tensor parallelism keeps the scales with their slices: per-row scales are cut like the rows;
a 128x128 block is never split between two ranks or two fused parts, so a layout whose slices
do not start on a multiple of 128 is refused when the model is built (`check_block_alignment`).

MoE experts (`Fp8ExpertsMethod`, for `FusedExperts`) hold e4m3 ``w13`` / ``w2`` with per-row
or block scales in the layout `kernels.moe.ExpertWeights` names, loaded and quantized the
same way, expert by expert; the fused MoE kernel runs them weight-only at decode sizes and
W8A8 at prefill sizes (kernels/moe_triton.py). A block scheme needs every tp slice of the
intermediate dimension to start on a block.

What stays unquantized: embeddings and the LM head, norms, and the MoE router.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from splitserve.kernels import dispatch as kernels
from splitserve.kernels.fp8 import FP8_DTYPE, Fp8Scheme, Fp8Weight, QuantizedRows, quantize
from splitserve.kernels.moe import ExpertWeights, scale_shapes
from splitserve.workers.quant_config import SCALE_NAMES, QuantConfig

logger = logging.getLogger(__name__)

#: The name every checkpoint scale is loaded as (``weight_scale_inv`` is a multiplier too).
SCALE_PARAM = "weight_scale"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def is_fp8(tensor: Any) -> bool:
    """A tensor, or a lazy safetensors slice, holds e4m3 values."""
    if isinstance(tensor, torch.Tensor):
        return tensor.dtype == FP8_DTYPE
    get_dtype = getattr(tensor, "get_dtype", None)
    return get_dtype is not None and get_dtype() == "F8_E4M3"


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.removeprefix("model.") == pattern.removeprefix("model.")


def linear_method(config: QuantConfig | None, hf_names: list[str]) -> "Fp8LinearMethod | None":
    """The method of a linear that fuses the checkpoint modules ``hf_names`` (q_proj, k_proj,
    v_proj ...): None when unquantized. A fused layer is quantized all or nothing."""
    return Fp8LinearMethod(config) if _quantized(config, [(name,) for name in hf_names]) else None


def experts_method(config: QuantConfig | None, spellings: list[tuple[str, ...]]) -> "Fp8ExpertsMethod | None":
    """The method of a layer's experts, or None when unquantized: all or nothing, as for a fused
    linear. ``spellings``: per expert projection, its checkpoint names under each family's
    spelling (ignored when the ignore list names any of them)."""
    return Fp8ExpertsMethod(config) if _quantized(config, spellings) else None


def _quantized(config: QuantConfig | None, spellings: list[tuple[str, ...]]) -> bool:
    if config is None:
        return False
    ignored = [any(_matches(name, p) for name in names for p in config.ignore) for names in spellings]
    if all(ignored):
        return False
    if any(ignored):
        shown = [names[0] for names in spellings[:6]] + (["..."] if len(spellings) > 6 else [])
        raise ValueError(f"{config.source} checkpoint quantizes only some of {shown}, which run as one fused "
                         "layer here: mixed quantization inside a fused layer is not supported")
    return True


class _Fp8Method:
    """What the FP8 linear and experts methods share: the config's scheme and block, restoring
    dtypes after ``model.to``, reading a checkpoint scale's slice, and quantizing a float slice
    at load."""

    #: The module's e4m3 parameters, then their float32 scales.
    E4M3_PARAMS: tuple[str, ...] = ()
    SCALE_PARAMS: tuple[str, ...] = ()

    def __init__(self, config: QuantConfig):
        self.config = config
        self.scheme = config.layer_scheme
        self.block = config.block

    def restore_dtypes(self, module: nn.Module) -> None:
        """After ``model.to(dtype)`` (which widens every float parameter, e4m3 included)."""
        for name in self.E4M3_PARAMS:
            getattr(module, name).data = getattr(module, name).data.to(FP8_DTYPE)
        for name in self.SCALE_PARAMS:
            getattr(module, name).data = getattr(module, name).data.float()

    def _row_scales(self, tensor, rows: range) -> torch.Tensor:
        """A checkpoint scale's part for rows ``rows`` of its weight (all columns): block rows
        [.., ceil(K / bk)], or one per row [len(rows), 1] (a per-tensor scale repeated)."""
        scale = _read_all(tensor).float()
        if self.scheme is Fp8Scheme.BLOCK:
            bn = self.block[0]
            return _as_block_scale(scale, self.config)[rows.start // bn:_cdiv(rows.stop, bn)]
        if scale.numel() == 1:  # per tensor: each row of this logical part takes it
            return scale.reshape(1, 1).expand(len(rows), 1)
        return scale.reshape(-1, 1)[rows.start:rows.stop]

    def _col_scales(self, tensor, cols: range, num_rows: int) -> torch.Tensor:
        """A checkpoint scale's part for columns ``cols`` of its weight (all ``num_rows`` rows):
        block columns [ceil(N / bn), ..], or one per row [num_rows, 1]."""
        scale = _read_all(tensor).float()
        if self.scheme is Fp8Scheme.BLOCK:
            bk = self.block[1]
            return _as_block_scale(scale, self.config)[:, cols.start // bk:_cdiv(cols.stop, bk)]
        if scale.numel() == 1:
            return scale.reshape(1, 1).expand(num_rows, 1)
        return scale.reshape(-1, 1)

    def _quantize(self, module: nn.Module, weight, derived: tuple[str, int]) -> Fp8Weight:
        """A float slice quantized here (its rows/blocks are whole: see the alignment checks);
        ``derived``, the (param, shard) of its scale, counts as loaded."""
        if self.config.prequantized:
            logger.info("a float weight in an FP8 checkpoint (not in its ignore list): quantized at load")
        module.derived_shards.add(derived)
        weight = _read_all(weight)
        device = getattr(module, self.E4M3_PARAMS[0]).device
        if device.type != "cpu":  # where the module lives: an 8B model's slices in seconds, not host minutes
            weight = weight.to(device)
        return quantize(weight, self.scheme, self.block)


class Fp8LinearMethod(_Fp8Method):
    """How one linear holds and runs FP8 weights (see the module docstring)."""

    E4M3_PARAMS = ("weight",)
    SCALE_PARAMS = ("weight_scale",)

    # ---- allocation ------------------------------------------------------------------------

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        if self.scheme is Fp8Scheme.BLOCK:
            shape = (_cdiv(out_features, self.block[0]), _cdiv(in_features, self.block[1]))
        else:
            shape = (out_features, 1)
        layer.weight_scale = nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)
        #: (param, shard) computed at load from a float weight rather than read.
        layer.derived_shards = set()

    def check_block_alignment(self, what: str, slices: list[tuple[int, int, int]], total: int, axis: str) -> None:
        """Refuse slices that would split a scale block: ``slices`` are (source start, our start,
        size) along ``axis`` ("rows" / "columns") of a parameter ``total`` long here. Each must
        start on a block boundary on both sides, and only the last may end inside a block."""
        if self.scheme is not Fp8Scheme.BLOCK:
            return
        size = self.block[0] if axis == "rows" else self.block[1]
        for src, dst, n in slices:
            if src % size or dst % size or (n % size and dst + n != total):
                raise ValueError(
                    f"{what}: FP8 block scales ({self.block[0]}x{self.block[1]}) need every tensor-parallel "
                    f"slice and fused part to start on a multiple of {size} {axis} (and only the last to end "
                    f"inside a block), but one is {axis} {src}..{src + n} of the checkpoint at {dst} here; "
                    f"use a tensor-parallel size that keeps the {axis} aligned")

    # ---- forward ---------------------------------------------------------------------------

    def weight(self, layer: nn.Module) -> Fp8Weight:
        return Fp8Weight(layer.weight, layer.weight_scale, self.scheme, self.block)

    def apply(self, layer: nn.Module, x: torch.Tensor | QuantizedRows, bias: torch.Tensor | None) -> torch.Tensor:
        return kernels.fp8_linear(x, self.weight(layer), bias)

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        """silu(gate) * up of a gate | up layer (no bias): one launch for a decode batch."""
        return kernels.fp8_silu_and_mul_linear(x, self.weight(layer))

    # ---- loading ---------------------------------------------------------------------------

    def load_column(self, layer: nn.Module, param: str, shard: int, tensor, src: range, dst: range) -> None:
        """Rows ``src`` of a checkpoint tensor (all columns) -> our rows ``dst``."""
        if param == "weight":
            rows = tensor[src.start:src.stop]
            if is_fp8(rows):
                _copy(layer.weight.data[dst.start:dst.stop], rows, f"weight[{shard}]")
                return
            q = self._quantize(layer, rows, (SCALE_PARAM, shard))
            _copy(layer.weight.data[dst.start:dst.stop], q.data, f"weight[{shard}]")
            self._scale_rows(layer, dst)[...] = q.scale
            return
        _check_scale_param(param)
        _copy(self._scale_rows(layer, dst), self._row_scales(tensor, src), f"{param}[{shard}]")

    def load_row(self, layer: nn.Module, param: str, tensor, cols: range) -> None:
        """Columns ``cols`` of a checkpoint tensor (all rows) -> all of ours."""
        if param == "weight":
            part = tensor[:, cols.start:cols.stop]
            if is_fp8(part):
                _copy(layer.weight.data, part, "weight")
                return
            q = self._quantize(layer, part, (SCALE_PARAM, 0))
            _copy(layer.weight.data, q.data, "weight")
            layer.weight_scale.data.copy_(q.scale)
            return
        _check_scale_param(param)
        _copy(layer.weight_scale.data, self._col_scales(tensor, cols, layer.weight.shape[0]), param)

    def _scale_rows(self, layer: nn.Module, dst: range) -> torch.Tensor:
        if self.scheme is Fp8Scheme.BLOCK:
            bn = self.block[0]
            return layer.weight_scale.data[dst.start // bn:_cdiv(dst.stop, bn)]
        return layer.weight_scale.data[dst.start:dst.stop]


class Fp8ExpertsMethod(_Fp8Method):
    """How a layer's experts (`FusedExperts`) hold, load and run FP8 weights: e4m3 ``w13`` /
    ``w2`` and float32 ``w13_scale`` / ``w2_scale`` (layouts: `kernels.moe.ExpertWeights`).
    Loader shards are the module's: w13's ``2 * local + (0 gate | 1 up)``, w2's ``local``, and
    the same for their scales."""

    E4M3_PARAMS = ("w13", "w2")
    SCALE_PARAMS = ("w13_scale", "w2_scale")

    def create_weights(self, experts: nn.Module, num_local: int, inter: int, hidden: int) -> None:
        experts.w13 = nn.Parameter(torch.empty(num_local, 2 * inter, hidden, dtype=FP8_DTYPE), requires_grad=False)
        experts.w2 = nn.Parameter(torch.empty(num_local, hidden, inter, dtype=FP8_DTYPE), requires_grad=False)
        s13, s2 = scale_shapes(self.scheme, self.block, num_local, inter, hidden)
        experts.w13_scale = nn.Parameter(torch.empty(s13, dtype=torch.float32), requires_grad=False)
        experts.w2_scale = nn.Parameter(torch.empty(s2, dtype=torch.float32), requires_grad=False)
        #: (param, shard) scales computed at load from a float weight rather than read.
        experts.derived_shards = set()

    def check_alignment(self, what: str, cols: range, total: int) -> None:
        """A block scheme's tp slice of the intermediate dimension (w13's rows, w2's columns)
        must start on a block and end on one, or at the end."""
        if self.scheme is not Fp8Scheme.BLOCK:
            return
        for size, axis in ((self.block[0], "rows of gate/up"), (self.block[1], "columns of down")):
            if cols.start % size or (len(cols) % size and cols.stop != total):
                raise ValueError(
                    f"{what}: FP8 block scales ({self.block[0]}x{self.block[1]}) need every tensor-parallel slice of "
                    f"the experts' intermediate dimension to start on a multiple of {size} ({axis}), but this rank "
                    f"holds {cols.start}..{cols.stop} of {total}; use a tensor-parallel size that keeps it aligned "
                    "(or expert parallel, which keeps experts whole)")

    def weights(self, experts: nn.Module) -> ExpertWeights:
        return ExpertWeights(experts.w13, experts.w2, self.scheme, experts.w13_scale, experts.w2_scale, self.block)

    def load(self, experts: nn.Module, param: str, shard: int, tensor, cols: range) -> None:
        """One checkpoint tensor of one expert: ``param`` w13 / w2 (a projection's weight: rows
        ``cols`` of gate or up, columns ``cols`` of down) or w13_scale / w2_scale (its scale)."""
        inter = len(cols)
        if param == "w13":
            local, half = divmod(shard, 2)
            rows = tensor[cols.start:cols.stop]
            if is_fp8(rows):
                _copy(experts.w13.data[local, half * inter:(half + 1) * inter], rows, f"w13[{shard}]")
                return
            q = self._quantize(experts, rows, ("w13_scale", shard))
            _copy(experts.w13.data[local, half * inter:(half + 1) * inter], q.data, f"w13[{shard}]")
            self._w13_scale(experts, local, half, inter)[...] = q.scale
            return
        if param == "w2":
            part = tensor[:, cols.start:cols.stop]
            if is_fp8(part):
                _copy(experts.w2.data[shard], part, f"w2[{shard}]")
                return
            q = self._quantize(experts, part, ("w2_scale", shard))
            _copy(experts.w2.data[shard], q.data, f"w2[{shard}]")
            self._w2_scale(experts, shard)[...] = q.scale
            return
        if param == "w13_scale":
            local, half = divmod(shard, 2)
            _copy(self._w13_scale(experts, local, half, inter), self._row_scales(tensor, cols), f"{param}[{shard}]")
            return
        if param == "w2_scale":
            _copy(self._w2_scale(experts, shard), self._col_scales(tensor, cols, experts.w2.shape[1]),
                  f"{param}[{shard}]")
            return
        raise ValueError(f"FP8 experts load w13, w2 and their scales, not {param!r}")

    def _w13_scale(self, experts: nn.Module, local: int, half: int, inter: int) -> torch.Tensor:
        """The scales of local expert ``local``'s gate (half 0) or up (1) part, shaped as a
        linear's: block rows, or [inter, 1] (a view of the [E, 2I] per-row table)."""
        if self.scheme is Fp8Scheme.BLOCK:
            nb = experts.w13_scale.shape[1] // 2
            return experts.w13_scale.data[local, half * nb:(half + 1) * nb]
        return experts.w13_scale.data[local, half * inter:(half + 1) * inter].unsqueeze(1)

    def _w2_scale(self, experts: nn.Module, local: int) -> torch.Tensor:
        """Local expert ``local``'s down scales, shaped as a linear's (see `_w13_scale`)."""
        scale = experts.w2_scale.data[local]
        return scale if self.scheme is Fp8Scheme.BLOCK else scale.unsqueeze(1)


def _check_scale_param(param: str) -> None:
    if param != SCALE_PARAM:  # e.g. a kv-cache or output scale: nothing of ours reads it
        raise ValueError(f"an FP8 linear loads 'weight' and '{SCALE_PARAM}', not {param!r}")


def _read_all(tensor) -> torch.Tensor:
    return tensor if isinstance(tensor, torch.Tensor) else tensor[...]  # [...] also reads 0-d scales


def _as_block_scale(scale: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    if scale.dim() != 2:
        raise ValueError(f"{config.source} checkpoint: expected 2-D block scales, got shape {tuple(scale.shape)}")
    return scale


def _copy(dest: torch.Tensor, src, what: str) -> None:
    src = src if isinstance(src, torch.Tensor) else torch.as_tensor(src)
    if tuple(dest.shape) != tuple(src.shape):
        raise ValueError(f"shape mismatch loading {what}: model shard {tuple(dest.shape)}, "
                         f"checkpoint slice {tuple(src.shape)}")
    dest.copy_(src)


def restore_quantized_dtypes(model: nn.Module) -> None:
    """Every FP8 linear's weight back to e4m3 and its scales to float32 (after ``model.to``)."""
    for module in model.modules():
        method = getattr(module, "quant", None)
        if isinstance(method, (Fp8LinearMethod, Fp8ExpertsMethod)):
            method.restore_dtypes(module)


def check_target(module: nn.Module, hf_name: str, tensor) -> None:
    """An e4m3 tensor (or a scale) may only land in an FP8 linear: anywhere else its values
    would be read without their scale."""
    if isinstance(getattr(module, "quant", None), (Fp8LinearMethod, Fp8ExpertsMethod)):
        return
    if is_fp8(tensor) or hf_name.endswith(f".{SCALE_PARAM}"):
        raise ValueError(f"checkpoint tensor {hf_name!r} is FP8 but the module it loads into is not quantized: "
                         "config.json has no quantization_config, or its ignore list names the module, or it is "
                         "one that stays unquantized here (embeddings, LM head, norms, MoE router)")


# ---- the checkpoint stream --------------------------------------------------------------------


def prepare_checkpoint(weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """The checkpoint's (name, tensor) as the model loads them: scale names unified to
    ``weight_scale``; ``input_scale`` dropped (activations are quantized dynamically, or not at
    all for experts)."""
    for name, tensor in weights:
        module, _, param = name.rpartition(".")
        if param == "input_scale":
            continue
        if param in SCALE_NAMES:
            param = SCALE_PARAM
        yield f"{module}.{param}", tensor
