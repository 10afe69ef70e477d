"""RoPE tables and rotation (kernels/rotary.py) against transformers' Llama rotary embedding.

Both sides compute in float32 the same way, so tables and rotated q/k must be bit-equal.
Positions are deliberately out of order and repeated: a batch mixes prompts, chunks and
decode steps, so each token is rotated by its own absolute position.
"""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from splitserve.kernels.rotary import RopeSpec, apply_rotary_ref, rope_cos_sin, rope_inv_freq

HEAD_DIM = 16
MAX_POS = 64
POSITIONS = [0, 1, 2, 7, 3, 40, 63, 7, 8]
HQ, HK = 4, 2

# Llama 3.1's real scaling numbers; with head_dim 16 and theta 5e5 the wavelengths fall in
# all three bands (kept, blended, divided by factor).
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}

CASES = {
    "default": (RopeSpec(head_dim=HEAD_DIM, theta=10000.0),
                {"rope_type": "default", "rope_theta": 10000.0}),
    "llama3": (RopeSpec(head_dim=HEAD_DIM, theta=500000.0, rope_type="llama3", factor=8.0,
                        low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192),
               {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}),
}


def hf_rotary(rope_parameters):
    config = LlamaConfig(hidden_size=HQ * HEAD_DIM, num_attention_heads=HQ, num_key_value_heads=HK,
                         head_dim=HEAD_DIM, max_position_embeddings=MAX_POS,
                         rope_parameters=rope_parameters)
    return LlamaRotaryEmbedding(config)


def hf_cos_sin(rope_parameters, positions, dtype=torch.float32):
    x = torch.zeros(1, len(positions), HEAD_DIM, dtype=dtype)
    cos, sin = hf_rotary(rope_parameters)(x, torch.tensor([positions]))
    return cos[0], sin[0]


def random_qk(t, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, HQ, HEAD_DIM, generator=g).to(dtype),
            torch.randn(t, HK, HEAD_DIM, generator=g).to(dtype))


@pytest.mark.parametrize("case", list(CASES))
def test_inv_freq_and_tables_equal_transformers(case):
    spec, params = CASES[case]
    assert torch.equal(rope_inv_freq(spec), hf_rotary(params).inv_freq)
    cos, sin = rope_cos_sin(spec, MAX_POS)
    assert cos.shape == sin.shape == (MAX_POS, HEAD_DIM)
    assert cos.dtype == sin.dtype == torch.float32
    hf_cos, hf_sin = hf_cos_sin(params, list(range(MAX_POS)))
    assert torch.equal(cos, hf_cos)
    assert torch.equal(sin, hf_sin)


@pytest.mark.parametrize("case", list(CASES))
def test_rotation_equals_apply_rotary_pos_emb(case):
    spec, params = CASES[case]
    cos, sin = rope_cos_sin(spec, MAX_POS)
    q, k = random_qk(len(POSITIONS))
    got_q, got_k = apply_rotary_ref(q, k, cos[POSITIONS], sin[POSITIONS])

    hf_cos, hf_sin = hf_cos_sin(params, POSITIONS)
    # transformers' layout: [batch, heads, tokens, head_dim], cos [batch, tokens, head_dim].
    want_q, want_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos[None], hf_sin[None])
    torch.testing.assert_close(got_q, want_q[0].transpose(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(got_k, want_k[0].transpose(0, 1), atol=1e-6, rtol=0)


def test_bfloat16_rotation_matches_transformers():
    spec, params = CASES["default"]
    cos, sin = rope_cos_sin(spec, MAX_POS)
    q, k = random_qk(len(POSITIONS), torch.bfloat16, seed=1)
    got_q, got_k = apply_rotary_ref(q, k, cos[POSITIONS], sin[POSITIONS])
    assert got_q.dtype == got_k.dtype == torch.bfloat16
    hf_cos, hf_sin = hf_cos_sin(params, POSITIONS, torch.bfloat16)
    want_q, want_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos[None], hf_sin[None])
    assert torch.equal(got_q, want_q[0].transpose(0, 1))
    assert torch.equal(got_k, want_k[0].transpose(0, 1))


def test_llama3_scaling_changes_low_frequencies_only():
    default = rope_inv_freq(RopeSpec(head_dim=HEAD_DIM, theta=500000.0))
    scaled = rope_inv_freq(CASES["llama3"][0])
    assert torch.equal(scaled[:4], default[:4])  # short wavelengths kept
    assert torch.allclose(scaled[5:], default[5:] / 8.0)  # long ones slowed by factor
    assert default[4] / 8.0 < scaled[4] < default[4]  # the band between is blended


def test_position_zero_is_identity():
    spec, _ = CASES["llama3"]
    cos, sin = rope_cos_sin(spec, 4)
    q, k = random_qk(1)
    got_q, got_k = apply_rotary_ref(q, k, cos[:1], sin[:1])
    assert torch.equal(got_q, q) and torch.equal(got_k, k)


@pytest.mark.parametrize("rope_type", ["yarn", "linear", "dynamic", ""])
def test_unsupported_rope_type_raises_value_error(rope_type):
    with pytest.raises(ValueError, match="unsupported rope scaling type"):
        RopeSpec(head_dim=HEAD_DIM, theta=10000.0, rope_type=rope_type)


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
], ids=["yarn", "linear"])
def test_unsupported_rope_type_in_a_model_config_raises_value_error(rope_parameters):
    """The rope type usually arrives in a Hugging Face config; it must be rejected clearly
    (docs/design.md invariant 4), not with a KeyError about a missing llama3 field."""
    from splitserve.workers.config import ModelConfig

    hf = LlamaConfig(hidden_size=HQ * HEAD_DIM, num_attention_heads=HQ, num_key_value_heads=HK,
                     head_dim=HEAD_DIM, intermediate_size=32, num_hidden_layers=1, vocab_size=16,
                     max_position_embeddings=MAX_POS, rope_parameters=rope_parameters)
    with pytest.raises(ValueError, match="unsupported rope scaling type"):
        ModelConfig.from_hf(hf)
