"""SamplingParams: vLLM defaults, normalisation, and one clear ValueError per bad field."""

import dataclasses
import math

import pytest
import torch

from splitserve.workers.sampling_params import FLOAT32_TINY, MAX_TEMPERATURE, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (16, 1.0, 1.0, -1, 0.0)
    assert p.seed is None and p.logprobs is None
    assert p.stop == () and p.stop_token_ids == ()
    assert not p.ignore_eos and p.min_tokens == 0 and not p.include_stop_str_in_output
    assert not p.is_greedy


@pytest.mark.parametrize(
    "stop, expected",
    [(None, ()), ("###", ("###",)), (["a", "bc"], ("a", "bc")), (("x",), ("x",))],
)
def test_stop_is_normalised_to_tuple(stop, expected):
    assert SamplingParams(stop=stop).stop == expected


def test_stop_token_ids_are_normalised_to_tuple():
    assert SamplingParams(stop_token_ids=[3, 7]).stop_token_ids == (3, 7)
    assert SamplingParams(stop_token_ids=None).stop_token_ids == ()


@pytest.mark.parametrize(
    "temperature, greedy", [(0.0, True), (1e-6, True), (1e-5, False), (0.7, False)]
)
def test_is_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).is_greedy is greedy


def test_greedy_constructor_and_with_():
    p = SamplingParams.greedy(max_tokens=4)
    assert p.is_greedy and p.max_tokens == 4
    assert p.with_(max_tokens=9).max_tokens == 9
    with pytest.raises(ValueError, match="max_tokens"):
        p.with_(max_tokens=0)  # a copy is validated too


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().max_tokens = 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": 1e300}, "temperature must be at most"),
        ({"temperature": 1e5}, "temperature must be at most"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 17}, "min_tokens .* max_tokens"),
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens .* max_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": ""}, "stop strings must not be empty"),
        ({"stop": ["ok", ""]}, "stop strings must not be empty"),
        ({"stop": [3]}, "stop must hold strings"),
        ({"stop_token_ids": [5, -1]}, "stop_token_ids"),
        ({"seed": "7"}, "seed"),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": -1}, {"top_k": 0}, {"top_k": 1}, {"top_p": 1.0}, {"top_p": 1e-9},
        {"min_p": 0.0}, {"min_p": 1.0}, {"min_tokens": 16}, {"logprobs": 0}, {"temperature": 0},
        {"seed": 0}, {"stop_token_ids": [0]}, {"temperature": MAX_TEMPERATURE}, {"top_p": FLOAT32_TINY},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_refusals_do_not_echo_huge_values():
    for huge in (10**400, 10**5000):  # ints: finite in Python, beyond any float
        for field in ("temperature", "top_p", "min_p"):
            with pytest.raises(ValueError, match=field) as err:
                SamplingParams(**{field: huge})
            assert len(str(err.value)) < 200


@pytest.mark.parametrize("top_p", [1e-46, 5e-324, 1e-40, FLOAT32_TINY / 2])
def test_top_p_below_float32_normal_is_clamped_to_keep_only_the_top_token(top_p):
    p = SamplingParams(top_p=top_p)
    assert p.top_p == FLOAT32_TINY
    assert p.with_(max_tokens=3).top_p == FLOAT32_TINY  # clamping again changes nothing


@pytest.mark.parametrize("min_p", [1e-46, 5e-324, FLOAT32_TINY / 2])
def test_min_p_below_float32_normal_is_clamped_to_zero(min_p):
    assert SamplingParams(min_p=min_p).min_p == 0.0


def test_float32_tiny_is_float32s_smallest_normal():
    assert FLOAT32_TINY == torch.finfo(torch.float32).tiny
    assert torch.tensor(FLOAT32_TINY, dtype=torch.float32).item() == FLOAT32_TINY


def _rows(params, n):
    from splitserve.workers.sampler import SampleRequest

    return [SampleRequest(params, None, 0, (2,)) for _ in range(n)]


def test_sampler_extreme_values_do_not_degenerate_to_token_0():
    """The accepted extremes keep their meaning in float32: a tiny top_p is argmax, the highest
    temperature with a masked (-inf) EOS logit still samples varied tokens, never nan -> 0."""
    from splitserve.workers.sampler import Sampler

    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    logits[:, 0] = -1.0  # token 0 is never the argmax
    out = Sampler()(logits, _rows(SamplingParams(top_p=1e-46), 64))
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    hot = SamplingParams(temperature=MAX_TEMPERATURE, min_tokens=1, max_tokens=4)  # masks EOS (2) with -inf
    out = Sampler()(logits, _rows(hot, 64))
    assert len(set(out.token_ids)) > 10 and 2 not in out.token_ids


def test_offline_engine_extreme_values_do_not_degenerate_to_token_0(tiny_models):
    """Through LLM.generate: top_p=1e-46 used to reach the sampler as float32 0, which dropped
    every token, so each step sampled token 0; temperature=1e300 became inf in float32. Now the
    first is clamped (and decodes as greedy does) and the second refused at construction."""
    from splitserve import LLM

    folder, _ = tiny_models("tiny-llama")
    prompts = [[5, 17, 42, 99, 7], [200, 12, 64]]
    llm = LLM(str(folder), show_progress=False, seed=0)
    greedy = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))
    tiny_top_p = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-46, seed=3))
    assert [o.token_ids for o in tiny_top_p] == [o.token_ids for o in greedy]
    assert all(set(o.token_ids) != {0} for o in tiny_top_p)
    with pytest.raises(ValueError, match="temperature must be at most"):
        llm.generate(prompts, SamplingParams(max_tokens=8, temperature=1e300))
