"""benchmarks/serve_workloads.py: seeded lengths and token ids, Poisson arrivals."""

from __future__ import annotations

import itertools
import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # scripts, not a package
from serve_workloads import LengthSpec, make_requests, poisson_arrivals, sample_lengths, token_id_range  # noqa: E402

CHAT = LengthSpec("chat", input_len=256, output_len=128, input_sigma=1.0, output_sigma=0.7,
                  min_input=16, max_input=2048, min_output=8, max_output=512)


def test_fixed_lengths():
    assert sample_lengths(LengthSpec("fixed", 1024, 128), 3, seed=5) == [(1024, 128)] * 3


def test_chat_lengths_are_seeded_clipped_and_long_tailed():
    lengths = sample_lengths(CHAT, 2000, seed=0)
    assert lengths == sample_lengths(CHAT, 2000, seed=0)
    assert lengths != sample_lengths(CHAT, 2000, seed=1)
    ins, outs = [i for i, _ in lengths], [o for _, o in lengths]
    assert all(16 <= i <= 2048 for i in ins) and all(8 <= o <= 512 for o in outs)
    assert min(ins) == 16 and max(ins) == 2048  # the clip bounds are reached: the tails are there
    # Medians near the asked ones; one in six beyond median * e^sigma (lognormal, 1 sigma).
    assert statistics.median(ins) == pytest.approx(256, rel=0.1)
    assert statistics.median(outs) == pytest.approx(128, rel=0.1)
    assert sum(i > 256 * math.e for i in ins) / len(ins) == pytest.approx(0.159, abs=0.03)
    assert statistics.mean(ins) > statistics.median(ins)  # skewed right


@pytest.mark.parametrize("bad", [dict(kind="poisson"), dict(input_len=0), dict(kind="chat", min_input=9, max_input=8),
                                 dict(kind="chat", output_sigma=-1.0)])
def test_bad_length_specs_are_refused(bad):
    with pytest.raises(ValueError):
        LengthSpec(**bad)


def test_requests_are_seeded_and_in_range():
    lengths = sample_lengths(CHAT, 50, seed=3)
    arrivals = poisson_arrivals(50, 4.0, seed=3)
    a = make_requests(lengths, arrivals, vocab_size=49152, token_seed="3-run0")
    assert a == make_requests(lengths, arrivals, vocab_size=49152, token_seed="3-run0")
    assert [(len(r.prompt_ids), r.output_len) for r in a] == lengths
    assert [r.arrival_s for r in a] == arrivals
    assert all(100 <= t < 49152 - 100 for r in a for t in r.prompt_ids)
    # Another run of a sweep: same lengths and times, fresh ids (no prefix-cache hits across runs).
    b = make_requests(lengths, arrivals, vocab_size=49152, token_seed="3-run1")
    assert [len(r.prompt_ids) for r in b] == [len(r.prompt_ids) for r in a]
    assert all(x.prompt_ids != y.prompt_ids for x, y in zip(a, b))
    lo, hi = token_id_range(256)  # a tiny test vocabulary keeps most of its ids
    assert (lo, hi) == (32, 224)


def test_poisson_arrivals_statistics():
    rate, n = 10.0, 4000
    times = poisson_arrivals(n, rate, seed=0)
    assert times == poisson_arrivals(n, rate, seed=0)
    assert times[0] == 0.0 and times == sorted(times)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.06)  # exponential: CV 1
    assert sum(g < 1 / rate for g in gaps) / len(gaps) == pytest.approx(1 - math.exp(-1), abs=0.03)
    # Counts per second are Poisson: variance about equal to the mean.
    counts = [0] * int(times[-1])
    for t in times:
        if int(t) < len(counts):
            counts[int(t)] += 1
    assert statistics.mean(counts) == pytest.approx(rate, rel=0.05)
    assert statistics.variance(counts) / statistics.mean(counts) == pytest.approx(1.0, abs=0.25)


def test_infinite_rate_sends_all_at_once_and_bad_rates_are_refused():
    assert poisson_arrivals(5, math.inf, seed=0) == [0.0] * 5
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError):
            poisson_arrivals(5, bad, seed=0)
