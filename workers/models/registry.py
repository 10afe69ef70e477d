"""Model registry: Hugging Face ``model_type`` -> our model class.

New families register here; everything else asks `build_model`.
"""

from __future__ import annotations

import torch
from torch import nn

from splitserve.workers.config import ModelConfig
from splitserve.workers.models.llama import LlamaForCausalLM
from splitserve.workers.models.mixtral import MixtralForCausalLM
from splitserve.workers.models.qwen3 import Qwen3ForCausalLM, Qwen3MoeForCausalLM
from splitserve.workers.models.quant import restore_quantized_dtypes
from splitserve.workers.parallel import ParallelState
from splitserve.workers.quant_config import QuantConfig

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "mixtral": MixtralForCausalLM,
}


def build_model(cfg: ModelConfig, parallel: ParallelState, device: torch.device, dtype: torch.dtype,
                quant: QuantConfig | None = None) -> nn.Module:
    """Allocate this rank's part of the model on ``device`` in ``dtype`` (weights uninitialised);
    with ``quant`` its projections hold FP8 weights and float32 scales (workers/models/quant.py)."""
    try:
        cls = MODEL_REGISTRY[cfg.model_type]
    except KeyError:
        raise ValueError(f"unsupported architecture {cfg.model_type!r}; supported: {sorted(MODEL_REGISTRY)}") from None
    # Built on the meta device first: no memory and no default init for weights that the
    # loader overwrites anyway (an 8B model would otherwise be initialised twice).
    with torch.device("meta"):
        model = cls(cfg, parallel, quant)
    model = model.to(dtype=dtype)
    restore_quantized_dtypes(model)  # `to` widened the e4m3 weights and scales with the rest
    model = model.to_empty(device=device)
    model.init_buffers(device)
    return model.eval()
