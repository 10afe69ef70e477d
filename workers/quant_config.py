"""Which quantization a model runs with: the user's ``quantization`` and the checkpoint's
``config.json`` ``quantization_config``, read once into a `QuantConfig`.

Lifecycle: the engine calls `resolve_quantization(requested, hf_config)` after resolving the
model (before any rank starts, so a refusal is immediate); the `QuantConfig` travels in the
`RunnerSpec` to every rank, where `build_model` gives it to the linears (workers/models/quant.py)
and the loader reads the checkpoint's tensors accordingly.

Formats read (FP8 e4m3 weights only; activations are always quantized dynamically, per token):

- compressed-tensors ``format: float-quantized``: ``config_groups.*.weights`` of ``type: float,
  num_bits: 8, strategy: tensor | channel | block`` (block: ``block_structure [128, 128]``);
  tensors ``<proj>.weight`` (F8_E4M3) and ``<proj>.weight_scale`` ([1] or [] per tensor,
  [N, 1] per channel, [N/128, K/128] per block); ``ignore`` lists modules left unquantized.
- ``quant_method: fp8`` (DeepSeek-V3, Qwen3-FP8): with ``weight_block_size [128, 128]``
  the scales are ``<proj>.weight_scale_inv`` [ceil(N/128), ceil(K/128)] (multipliers, despite the
  name); without, one ``<proj>.weight_scale`` per tensor.
- an unquantized checkpoint with ``quantization="fp8"``: quantized at load, per output channel.

Static activation scales, other bit widths and other methods (int4, AWQ, GPTQ, ...) are refused
with a ValueError that says what was found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from splitserve.kernels.fp8 import BLOCK, Fp8Scheme

#: What ``quantization=`` may ask for.
SUPPORTED_QUANTIZATION = ("fp8",)
#: Checkpoint scale tensor names -> the one name our layers load them as.
SCALE_NAMES = ("weight_scale", "weight_scale_inv")


@dataclass(frozen=True)
class QuantConfig:
    """FP8 weights: how the checkpoint stores them and how our linears hold them."""

    #: The checkpoint's scheme (CHANNEL when quantizing an unquantized checkpoint at load).
    scheme: Fp8Scheme
    #: The checkpoint holds e4m3 weights and scales (False: float weights, quantized at load).
    prequantized: bool
    #: Block (rows, cols) of BLOCK scales.
    block: tuple[int, int] = (BLOCK, BLOCK)
    #: Module names (or ``re:`` patterns) the checkpoint left unquantized (compressed-tensors).
    ignore: tuple[str, ...] = ()
    #: Where the config came from, for messages ("compressed-tensors", "fp8", "quantization='fp8'").
    source: str = "quantization='fp8'"

    @property
    def layer_scheme(self) -> Fp8Scheme:
        """How a linear holds its scales: per tensor becomes per channel, so a fused layer
        (q|k|v, gate|up) keeps one scale per logical part (each row takes its part's)."""
        return Fp8Scheme.CHANNEL if self.scheme is Fp8Scheme.TENSOR else self.scheme


def resolve_quantization(requested: str | None, hf_config: Any) -> QuantConfig | None:
    """The quantization to run with, or None for none (see the module docstring)."""
    if requested is not None and requested not in SUPPORTED_QUANTIZATION:
        raise ValueError(f"quantization {requested!r} is not supported; choose one of "
                         f"{list(SUPPORTED_QUANTIZATION)} or leave it unset")
    raw = getattr(hf_config, "quantization_config", None)
    if raw is not None and not isinstance(raw, dict):
        raw = raw.to_dict()
    if not raw:
        return None if requested is None else QuantConfig(Fp8Scheme.CHANNEL, prequantized=False)
    # A quantized checkpoint says what it is; asking for fp8 over an fp8 checkpoint is the same.
    return parse_checkpoint_quantization(raw)


def parse_checkpoint_quantization(raw: dict[str, Any]) -> QuantConfig:
    method = raw.get("quant_method")
    if method == "fp8":
        return _parse_fp8(raw)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(raw)
    raise ValueError(f"checkpoint quantization {method!r} is not supported: splitserve loads FP8 (e4m3) "
                     "checkpoints (quant_method 'fp8' or compressed-tensors 'float-quantized') and "
                     "unquantized ones")


def _parse_fp8(raw: dict[str, Any]) -> QuantConfig:
    if raw.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"quant_method 'fp8' with fmt {raw['fmt']!r}: only e4m3 weights are supported")
    if raw.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"quant_method 'fp8' with activation_scheme {raw['activation_scheme']!r}: static "
                         "input scales are not supported (activations are quantized dynamically, per token)")
    ignore = tuple(raw.get("ignored_layers") or raw.get("modules_to_not_convert") or ())
    block = raw.get("weight_block_size")
    if block is None:
        return QuantConfig(Fp8Scheme.TENSOR, prequantized=True, ignore=ignore, source="fp8")
    return QuantConfig(Fp8Scheme.BLOCK, prequantized=True, block=_check_block(block, "weight_block_size"),
                       ignore=ignore, source="fp8")


def _parse_compressed_tensors(raw: dict[str, Any]) -> QuantConfig:
    fmt = raw.get("format")
    if fmt != "float-quantized":
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported: only 'float-quantized' "
                         "(FP8 e4m3 weights)")
    groups = raw.get("config_groups") or {}
    if not groups:
        raise ValueError("compressed-tensors config without config_groups")
    configs = set()
    for name, group in groups.items():
        weights = group.get("weights") or {}
        where = f"compressed-tensors group {name!r}"
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise ValueError(f"{where}: weights of type {weights.get('type')!r} with {weights.get('num_bits')} "
                             "bits are not supported (only float, 8 bits: e4m3)")
        if not weights.get("symmetric", True):
            raise ValueError(f"{where}: asymmetric weights are not supported")
        if weights.get("dynamic"):
            raise ValueError(f"{where}: dynamic weight scales are not supported")
        _check_activations(group.get("input_activations"), where)
        strategy = weights.get("strategy")
        if strategy == "block":
            configs.add((Fp8Scheme.BLOCK, _check_block(weights.get("block_structure"), "block_structure")))
        elif strategy in ("tensor", "channel"):
            configs.add((Fp8Scheme(strategy), (BLOCK, BLOCK)))
        else:
            raise ValueError(f"{where}: weight strategy {strategy!r} is not supported (tensor, channel, block)")
    if len(configs) > 1:
        raise ValueError(f"compressed-tensors groups with different weight strategies are not supported: {configs}")
    (scheme, block), = configs
    return QuantConfig(scheme, prequantized=True, block=block, ignore=tuple(raw.get("ignore") or ()),
                       source="compressed-tensors")


def _check_activations(acts: dict[str, Any] | None, where: str) -> None:
    if acts is None:  # weight-only checkpoint: we still quantize activations dynamically
        return
    if acts.get("type", "float") != "float" or acts.get("num_bits", 8) != 8:
        raise ValueError(f"{where}: input activations of type {acts.get('type')!r} with "
                         f"{acts.get('num_bits')} bits are not supported")
    if not acts.get("dynamic", False):
        raise ValueError(f"{where}: static input scales are not supported (activations are quantized "
                         "dynamically, per token)")


def _check_block(block: Any, key: str) -> tuple[int, int]:
    if block is None or list(block) != [BLOCK, BLOCK]:
        raise ValueError(f"FP8 block scales with {key} {block!r}: only [{BLOCK}, {BLOCK}] is supported")
    return (BLOCK, BLOCK)
