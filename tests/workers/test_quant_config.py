"""`resolve_quantization` (workers/quant_config.py): each published FP8 config is read into the
scheme the loader expects, a float checkpoint with ``quantization="fp8"`` is quantized per
channel at load, and everything else is refused with a ValueError that names it, before any
rank starts (through `LLM` too). `linear_method` leaves ignored modules unquantized."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from splitserve import LLM
from splitserve.kernels.fp8 import Fp8Scheme
from splitserve.workers.models.quant import Fp8LinearMethod, linear_method
from splitserve.workers.quant_config import QuantConfig, resolve_quantization

CT_CHANNEL = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True},
    }},
}


def _hf(quantization_config=None):
    return SimpleNamespace(quantization_config=quantization_config)


def _ct(**weights):
    raw = copy.deepcopy(CT_CHANNEL)
    raw["config_groups"]["group_0"]["weights"].update(weights)
    return raw


@pytest.mark.parametrize("raw,scheme,layer_scheme", [
    (CT_CHANNEL, Fp8Scheme.CHANNEL, Fp8Scheme.CHANNEL),
    (_ct(strategy="tensor"), Fp8Scheme.TENSOR, Fp8Scheme.CHANNEL),
    (_ct(strategy="block", block_structure=[128, 128]), Fp8Scheme.BLOCK, Fp8Scheme.BLOCK),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
     Fp8Scheme.BLOCK, Fp8Scheme.BLOCK),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, Fp8Scheme.TENSOR, Fp8Scheme.CHANNEL),
])
@pytest.mark.parametrize("requested", [None, "fp8"])
def test_published_fp8_configs_are_read_with_or_without_asking(raw, scheme, layer_scheme, requested):
    quant = resolve_quantization(requested, _hf(raw))
    assert quant.prequantized and quant.scheme is scheme and quant.layer_scheme is layer_scheme


def test_a_float_checkpoint_is_quantized_per_channel_only_when_asked():
    assert resolve_quantization(None, _hf()) is None
    assert resolve_quantization("fp8", _hf()) == QuantConfig(Fp8Scheme.CHANNEL, prequantized=False)


@pytest.mark.parametrize("requested,raw,match", [
    ("int4", None, "quantization 'int4' is not supported"),
    (None, {"quant_method": "awq", "bits": 4}, "checkpoint quantization 'awq' is not supported"),
    ("fp8", {"quant_method": "gptq", "bits": 4}, "'gptq' is not supported"),
    (None, {"quant_method": "fp8", "activation_scheme": "static"}, "static input scales"),
    (None, {"quant_method": "fp8", "weight_block_size": [64, 64]}, r"only \[128, 128\]"),
    (None, _ct(type="int", num_bits=4), "type 'int' with 4 bits"),
    (None, _ct(strategy="group", group_size=128), "strategy 'group'"),
    (None, dict(CT_CHANNEL, format="pack-quantized"), "format 'pack-quantized'"),
    (None, {**CT_CHANNEL, "config_groups": {"g": {**CT_CHANNEL["config_groups"]["group_0"],
                                                   "input_activations": {"type": "float", "num_bits": 8,
                                                                         "dynamic": False}}}},
     "static input scales"),
])
def test_unsupported_quantization_is_refused_by_name(requested, raw, match):
    with pytest.raises(ValueError, match=match):
        resolve_quantization(requested, _hf(raw))


def test_the_engine_refuses_before_any_rank_starts():
    with pytest.raises(ValueError, match="quantization 'int4' is not supported"):
        LLM("random:tiny-llama", quantization="int4", show_progress=False)


def test_random_weights_with_fp8_run_on_cpu():
    from splitserve import SamplingParams

    with LLM("random:tiny-llama", quantization="fp8", show_progress=False) as llm:
        qkv = llm.engine.executor_for_tests.runner.model.layers[0].self_attn.qkv_proj
        assert str(qkv.weight.dtype) == "torch.float8_e4m3fn"
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert len(out[0].token_ids) == 3


def test_ignored_modules_stay_unquantized_and_a_half_ignored_fused_layer_is_refused():
    quant = resolve_quantization(None, _hf(dict(CT_CHANNEL, ignore=["lm_head", "re:.*layers\\.0\\.mlp\\.",
                                                                   "model.layers.1.self_attn.q_proj"])))
    assert linear_method(quant, ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]) is None
    assert isinstance(linear_method(quant, ["model.layers.1.mlp.down_proj"]), Fp8LinearMethod)
    assert linear_method(None, ["model.layers.1.mlp.down_proj"]) is None
    with pytest.raises(ValueError, match="mixed quantization inside a fused layer"):
        linear_method(quant, [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"])
