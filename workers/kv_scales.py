"""The FP8 KV cache's scales: where they come from, and the fingerprint two groups compare.

An FP8 cache (`kv_cache.py`) stores ``value / scale`` per (layer, K or V, KV head); a decode
group reads blocks a prefill group wrote, so both must hold the *same* scales. Lifecycle, once
per rank at start-up (`ModelRunner.create`), before warm-up and CUDA graph capture:

1. **From the checkpoint**, when it has them: `split_checkpoint_scales` takes the tensors
   named like published FP8 checkpoints (``model.layers.N.self_attn.k_scale`` / ``v_scale``,
   or ``...self_attn.attn.k_scale``), scalar (per tensor: broadcast over the heads) or one per
   KV head, out of the weight stream before the model sees it; `checkpoint_scales` cuts this
   rank's (layers, heads) slice. Every layer of the rank must have both, or none does.
2. **Computed** otherwise, by a calibration pass (`ModelRunner.calibrate_kv_scales`): one
   prefill of a fixed built-in token sequence (`calibration_token_ids`), recording per layer and
   per KV head the largest |K| (after rotary, what the cache stores) and |V|; then
   `scales_from_amax`: ``scale = 2 ** ceil(log2(amax * MARGIN / 448))``.
   - Deterministic: same weights, same tokens, same kernels -> the same amax on a prefill
     group and on a decode group, with no message between them.
   - Powers of two: a group of another (tp, pp) layout sums its matmuls in another order, so
     its amax may differ in the last bits; rounding up to a power of two absorbs that (unless
     an amax sits right on a power of two, which the fingerprint check then reports rather than
     letting the groups misread each other's blocks). ``value / scale`` is then also exact
     scaling (no rounding besides e4m3's own).
   - ``MARGIN`` (4) is headroom for prompts whose K/V run larger than the calibration text's;
     e4m3 is floating point, so headroom costs only the smallest binades (values below about
     2**-9 * scale), and values beyond it saturate at +-448 instead of overflowing.

The groups' agreement: each rank reports its slice (`RankKVScales`, with its `Ready`), the
driver puts a group's slices together into one ``[num_layers, 2, num_kv_heads]`` tensor and
hashes it (`scales_fingerprint`); `kvtransfer.plan.check_layouts` refuses to connect a prefill
group and a decode group whose KV dtype or fingerprint differ.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from splitserve.kernels.attention import FP8_MAX
from splitserve.kvtransfer.messages import RankKVScales

#: Headroom of computed scales over the calibration amax (module docstring).
MARGIN = 4.0
#: Tokens in the calibration prefill (fewer if the model or the cache is shorter).
CALIBRATION_TOKENS = 64

_SCALE_NAME = re.compile(r"^(?:model\.)?layers\.(\d+)\.self_attn\.(?:attn\.)?([kv])_scale$")


def calibration_token_ids(vocab_size: int, max_len: int) -> list[int]:
    """The fixed built-in calibration sequence: ids spread over the whole vocabulary by a
    constant stride (a prime, so they do not repeat), the same on every group and every run."""
    return spread_token_ids(vocab_size, max(1, min(CALIBRATION_TOKENS, max_len)))


def spread_token_ids(vocab_size: int, n: int) -> list[int]:
    """``n`` ids spread over the vocabulary by a prime stride (also the start-up warm-up's)."""
    return [(7919 * i + 13) % vocab_size for i in range(n)]


def scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """amax [..] -> float32 scales of the same shape: the power of two at or above
    ``amax * MARGIN / 448`` (1 where amax is 0: nothing to scale)."""
    scales = torch.ones_like(amax, dtype=torch.float32)
    flat = amax.detach().to(torch.float64).cpu().flatten().tolist()
    values = [2.0 ** math.ceil(math.log2(a * MARGIN / FP8_MAX)) if a > 0 else 1.0 for a in flat]
    return scales.copy_(torch.tensor(values, dtype=torch.float32).view(amax.shape))


def split_checkpoint_scales(weights: Iterable[tuple[str, Any]],
                            found: dict[tuple[int, int], torch.Tensor]) -> Iterator[tuple[str, Any]]:
    """The weight stream without its KV scale tensors, which go into ``found`` as
    ``(layer, 0 for K / 1 for V) -> float32 tensor`` (a scalar or one per KV head)."""
    for name, tensor in weights:
        match = _SCALE_NAME.match(name)
        if match is None:
            yield name, tensor
            continue
        value = tensor[...] if not isinstance(tensor, torch.Tensor) else tensor  # a lazy slice reads here
        found[(int(match.group(1)), 0 if match.group(2) == "k" else 1)] = \
            torch.as_tensor(value).detach().to(torch.float32).flatten().cpu()


def checkpoint_scales(found: dict[tuple[int, int], torch.Tensor], layers: range, heads: range,
                      num_kv_heads: int) -> torch.Tensor | None:
    """This rank's [len(layers), 2, len(heads)] scales from the checkpoint's, or None when it
    has none for these layers. Raises ValueError when only some are there, or a shape is odd."""
    wanted = [(layer, kv) for layer in layers for kv in (0, 1)]
    present = [key for key in wanted if key in found]
    if not present:
        return None
    if len(present) != len(wanted):
        missing = sorted(set(wanted) - set(present))[:4]
        raise ValueError(f"the checkpoint has KV scales for some layers but not for (layer, K=0/V=1) {missing}: "
                         "give every layer's k_scale and v_scale, or none")
    out = torch.empty(len(layers), 2, len(heads), dtype=torch.float32)
    for i, layer in enumerate(layers):
        for kv in (0, 1):
            value = found[(layer, kv)]
            if value.numel() == 1:
                out[i, kv] = value.item()
            elif value.numel() == num_kv_heads:
                out[i, kv] = value[heads.start:heads.stop]
            else:
                raise ValueError(f"layer {layer} {'kv'[kv]}_scale has {value.numel()} values: expected 1 "
                                 f"(per tensor) or {num_kv_heads} (per KV head)")
    if not bool((out > 0).all()) or not bool(torch.isfinite(out).all()):
        raise ValueError("the checkpoint's KV scales must be positive and finite")
    return out


def rank_scales(scales: torch.Tensor, layer_start: int, head_start: int) -> RankKVScales:
    """A rank's slice of the scales as it travels to the driver (plain floats)."""
    return RankKVScales(layer_start, head_start, tuple(tuple(tuple(h) for h in kv) for kv in scales.tolist()))


def assemble_scales(slices: Iterable[RankKVScales], num_layers: int, num_kv_heads: int) -> torch.Tensor:
    """The group's [num_layers, 2, num_kv_heads] scales from its ranks' slices (KV-head
    replicas hold the same values); ValueError if some (layer, head) is in no slice."""
    full = torch.full((num_layers, 2, num_kv_heads), float("nan"), dtype=torch.float32)
    for s in slices:
        part = torch.tensor(s.values, dtype=torch.float32)
        full[s.layer_start:s.layer_start + part.shape[0], :, s.head_start:s.head_start + part.shape[2]] = part
    if bool(torch.isnan(full).any()):
        raise ValueError("the ranks' KV scale slices do not cover every layer and KV head")
    return full


def scales_fingerprint(scales: torch.Tensor) -> str:
    """A short hash of a group's whole scales tensor (float32 bytes): equal iff bit-identical."""
    data = scales.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]
