"""Sampler: greedy exactness, each filter, seeded reproducibility, min_tokens, logprobs.

Random draws use fixed seeds, so statistical checks are deterministic, not flaky."""

import math

import pytest
import torch

from splitserve.workers.sampler import SampleRequest, Sampler, make_generator
from splitserve.workers.sampling_params import SamplingParams

V = 1000
sampler = Sampler()


def row(params=None, seed=None, num_output_tokens=0, eos=None, **kw):
    params = params or SamplingParams(seed=seed, **kw)
    return SampleRequest(params, make_generator(params.seed), num_output_tokens, () if eos is None else (eos,))


def random_logits(b, v=V, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def repeated(probs, n):
    """n identical rows whose softmax is `probs` (for frequency checks)."""
    return torch.tensor(probs).log().expand(n, -1).contiguous()


def frequencies(tokens, v):
    return torch.bincount(torch.tensor(tokens), minlength=v).double() / len(tokens)


def test_greedy_is_exactly_argmax_and_leaves_logits_intact():
    logits = random_logits(16)
    before = logits.clone()
    out = sampler(logits, [row(temperature=0.0) for _ in range(16)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 16
    assert torch.equal(logits, before)


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = random_logits(6)
    rows = [row(temperature=0.0) if i % 2 == 0 else row(seed=i) for i in range(6)]
    out = sampler(logits, rows)
    assert out.token_ids[0::2] == logits[0::2].argmax(dim=-1).tolist()


def test_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="len\\(rows\\)"):
        sampler(random_logits(3), [row()] * 2)


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_degenerate_filters_equal_greedy(kw):
    logits = random_logits(32)
    torch.manual_seed(0)
    out = sampler(logits, [row(temperature=1.5, **kw) for _ in range(32)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_unfiltered_sampling_is_not_greedy():
    # The counterpart of the test above: without a filter the draws must spread out.
    logits = repeated([0.4, 0.3, 0.2, 0.1], 200)
    torch.manual_seed(0)
    assert len(set(sampler(logits, [row() for _ in range(200)]).token_ids)) == 4


PROBS = [0.5, 0.3, 0.15, 0.05]


@pytest.mark.parametrize(
    "kw, allowed",
    [
        ({"top_k": 2}, {0, 1}),
        ({"top_k": 3}, {0, 1, 2}),
        ({"top_p": 0.7}, {0, 1}),  # 0.5 < 0.7 <= 0.8: the two most likely tokens
        ({"top_p": 0.85}, {0, 1, 2}),
        ({"min_p": 0.2}, {0, 1, 2}),  # threshold 0.1 drops only the 0.05 token
        ({"min_p": 0.5}, {0, 1}),  # threshold 0.25
        ({"top_k": 3, "min_p": 0.5}, {0, 1}),
    ],
)
def test_filters_keep_exactly_the_expected_tokens(kw, allowed):
    n = 2000
    torch.manual_seed(1)
    tokens = sampler(repeated(PROBS, n), [row(**kw) for _ in range(n)]).token_ids
    assert set(tokens) == allowed


def test_filters_apply_per_row():
    # One batch, different filters per row: vectorised filtering must not mix rows up.
    n = 600
    kws = [{"top_k": 1}, {"top_p": 0.7}, {}]
    rows = [row(**kws[i % 3]) for i in range(n)]
    torch.manual_seed(2)
    tokens = sampler(repeated(PROBS, n), rows).token_ids
    assert set(tokens[0::3]) == {0}
    assert set(tokens[1::3]) == {0, 1}
    assert set(tokens[2::3]) == {0, 1, 2, 3}


def chi_square(tokens, expected):
    observed = frequencies(tokens, len(expected)) * len(tokens)
    exp = torch.tensor(expected, dtype=torch.float64) * len(tokens)
    return float(((observed - exp) ** 2 / exp).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_gives_the_tempered_distribution(temperature):
    n = 20000
    p = torch.tensor(PROBS, dtype=torch.float64)
    expected = (p ** (1 / temperature)) / (p ** (1 / temperature)).sum()
    torch.manual_seed(3)
    tokens = sampler(repeated(PROBS, n), [row(temperature=temperature)] * n).token_ids
    # 3 degrees of freedom: P(chi2 > 16.3) = 0.001; the seed is fixed, so this never flakes.
    assert chi_square(tokens, expected.tolist()) < 16.3
    # ...and it tells temperatures apart: the untempered distribution does not fit.
    if temperature != 1.0:
        assert chi_square(tokens, PROBS) > 100


def test_top_p_renormalises_over_the_kept_tokens():
    n = 20000
    torch.manual_seed(4)
    tokens = sampler(repeated(PROBS, n), [row(top_p=0.7)] * n).token_ids
    assert set(tokens) == {0, 1}
    # 1 degree of freedom: P(chi2 > 10.8) = 0.001.
    assert chi_square(tokens, [0.5 / 0.8, 0.3 / 0.8]) < 10.8


def draw_sequence(logits_steps, position, others, seed=1234, **kw):
    """Tokens of a seeded row sampled over several steps at `position` among `others`."""
    target = row(seed=seed, **kw)
    tokens = []
    for step, logits in enumerate(logits_steps):
        rows = others[:position] + [target] + others[position:]
        batch = torch.cat([random_logits(position, seed=100 + step), logits.unsqueeze(0),
                           random_logits(len(others) - position, seed=200 + step)])
        tokens.append(sampler(batch, rows).token_ids[position])
    return tokens


@pytest.mark.parametrize(
    "kw", [{}, {"top_k": 50, "top_p": 0.9}, {"min_p": 0.05, "temperature": 0.8}]
)
def test_seeded_row_is_reproducible_across_batches(kw):
    steps = [random_logits(1, seed=s)[0] / 3 for s in range(8)]  # flat enough to vary
    alone = draw_sequence(steps, 0, [], **kw)
    mixed = [row(temperature=0.0), row(seed=99), row(), row(top_k=5)]
    torch.manual_seed(5)
    assert draw_sequence(steps, 2, mixed, **kw) == alone
    torch.manual_seed(6)  # a different global RNG state must not matter either
    assert draw_sequence(steps, 4, mixed, **kw) == alone
    assert draw_sequence(steps, 0, [], seed=4321, **kw) != alone  # the seed does matter


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


EOS = 3


def eos_favoured_logits(b=1):
    logits = torch.zeros(b, 10)
    logits[:, EOS] = 10.0
    logits[:, 7] = 9.0
    logits[:, 5] = 5.0
    return logits


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_masks_eos_and_stop_token_ids(temperature):
    params = SamplingParams(temperature=temperature, min_tokens=2, stop_token_ids=[7], seed=0)
    logits = eos_favoured_logits()
    before = logits.clone()
    for n in (0, 1):
        token = sampler(logits, [row(params, num_output_tokens=n, eos=EOS)]).token_ids[0]
        assert token not in (EOS, 7)
    assert torch.equal(logits, before)  # masking works on a copy
    if temperature == 0.0:  # once min_tokens is reached EOS is back
        assert sampler(logits, [row(params, num_output_tokens=2, eos=EOS)]).token_ids == [EOS]


def test_min_tokens_masks_only_its_own_row():
    logits = eos_favoured_logits(2)
    rows = [row(temperature=0.0, min_tokens=1, eos=EOS), row(temperature=0.0, eos=EOS)]
    assert sampler(logits, rows).token_ids == [7, EOS]


def test_logprobs_match_log_softmax_and_rank():
    logits = random_logits(4)
    expected = torch.log_softmax(logits, dim=-1)
    rows = [row(temperature=0.0, logprobs=5), row(temperature=0.0),
            row(seed=1, temperature=0.7, logprobs=0), row(seed=2, temperature=2.0, logprobs=3)]
    out = sampler(logits, rows)
    assert out.logprobs[1] is None
    for i in (0, 2, 3):
        lp, tok = out.logprobs[i], out.token_ids[i]
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(expected[i, tok].item(), abs=1e-6)
        assert lp.rank == int((expected[i] > expected[i, tok]).sum()) + 1
        n = rows[i].params.logprobs
        top = expected[i].topk(n)
        assert list(lp.top) == top.indices.tolist()
        assert list(lp.top.values()) == pytest.approx(top.values.tolist(), abs=1e-6)
    assert out.logprobs[0].rank == 1
    assert sum(math.exp(v) for v in out.logprobs[0].top.values()) < 1.0


def test_logprobs_are_raw_even_when_min_tokens_masks_the_top_token():
    logits = eos_favoured_logits()
    out = sampler(logits, [row(temperature=0.0, min_tokens=1, eos=EOS, logprobs=2)])
    lp = out.logprobs[0]
    raw = torch.log_softmax(logits[0], dim=-1)
    assert (lp.token_id, lp.rank) == (7, 2)  # EOS was masked for sampling...
    assert lp.logprob == pytest.approx(raw[7].item())
    assert lp.top[EOS] == pytest.approx(raw[EOS].item())  # ...but still shows in the logprobs
