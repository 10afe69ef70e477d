"""SamplingParams: vLLM defaults, normalisation, and one clear ValueError per bad field."""

import dataclasses
import math

import pytest

from splitserve.workers.sampling_params import SamplingParams


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
        {"seed": 0}, {"stop_token_ids": [0]},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)
