"""Seeded serving workloads: prompt and output lengths, prompt token ids, arrival times.

    lengths = sample_lengths(spec, num_prompts, seed)        # (input_len, output_len) per request
    arrivals = poisson_arrivals(num_prompts, rate, seed)      # seconds after the start
    requests = make_requests(lengths, arrivals, vocab_size, token_seed)

Lengths and arrivals depend only on the seed (and the rate), so every backend and every rate of
a sweep sees the same requests in the same order. Token ids are drawn from their own seed: runs
of a sweep use fresh ids (``token_seed`` differs per run) so a server's prefix cache cannot serve
one run's prompts from the previous run's.

Prompts are random token ids, which models without a tokenizer (``random:<name>``) accept and
which need no detokenization to build; requests are sent with ``ignore_eos`` so every request
generates exactly its output length.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

#: Ids this close to either end of the vocabulary are skipped (special tokens live there).
SPECIAL_ID_MARGIN = 100


@dataclass(frozen=True)
class LengthSpec:
    """How input and output lengths are drawn.

    ``fixed``: every request has ``input_len`` prompt tokens and ``output_len`` output tokens.

    ``chat``: a long-tailed mix loosely shaped like chat traffic (many short turns, a few long
    pastes; answers shorter and less spread than prompts). Each length is lognormal with median
    ``input_len`` / ``output_len`` and log-space standard deviation ``input_sigma`` /
    ``output_sigma``, rounded and clipped to ``[min_input, max_input]`` / ``[min_output,
    max_output]``. With the chat defaults of the command line (medians 256 and 128, sigmas 1.0
    and 0.7) one prompt in six is longer than 256·e ≈ 700 tokens and one answer in six longer
    than 128·e^0.7 ≈ 260 (one standard deviation in log space).
    """

    kind: Literal["fixed", "chat"] = "fixed"
    input_len: int = 1024
    output_len: int = 128
    input_sigma: float = 1.0
    output_sigma: float = 0.7
    min_input: int = 16
    max_input: int = 4096
    min_output: int = 16
    max_output: int = 1024

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "chat"):
            raise ValueError(f"workload must be 'fixed' or 'chat', got {self.kind!r}")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(f"input and output lengths must be >= 1, got {self.input_len} and {self.output_len}")
        if self.kind == "chat":
            if self.input_sigma < 0 or self.output_sigma < 0:
                raise ValueError("sigmas must be >= 0")
            if not 1 <= self.min_input <= self.max_input:
                raise ValueError(f"need 1 <= min_input <= max_input, got {self.min_input}..{self.max_input}")
            if not 1 <= self.min_output <= self.max_output:
                raise ValueError(f"need 1 <= min_output <= max_output, got {self.min_output}..{self.max_output}")

    @property
    def longest_request(self) -> int:
        """Prompt + output tokens of the longest request this spec can draw."""
        if self.kind == "fixed":
            return self.input_len + self.output_len
        return self.max_input + self.max_output


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    output_len: int
    #: Seconds after the run's start at which the request is sent.
    arrival_s: float


def sample_lengths(spec: LengthSpec, num_prompts: int, seed: int) -> list[tuple[int, int]]:
    """(input_len, output_len) for each request, in arrival order."""
    if num_prompts < 1:
        raise ValueError(f"need at least one prompt, got {num_prompts}")
    if spec.kind == "fixed":
        return [(spec.input_len, spec.output_len)] * num_prompts
    rng = random.Random(f"{seed}-lengths")
    return [(_lognormal_int(rng, spec.input_len, spec.input_sigma, spec.min_input, spec.max_input),
             _lognormal_int(rng, spec.output_len, spec.output_sigma, spec.min_output, spec.max_output))
            for _ in range(num_prompts)]


def _lognormal_int(rng: random.Random, median: int, sigma: float, lo: int, hi: int) -> int:
    return min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))


def poisson_arrivals(num_prompts: int, rate: float, seed: int) -> list[float]:
    """Arrival times of a Poisson process of ``rate`` requests/s; ``inf`` sends all at once.

    The first request arrives at 0 (the run starts with work, not with an idle wait); each
    later one an exponentially distributed gap (mean ``1/rate``) after the one before.
    """
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if math.isinf(rate):
        return [0.0] * num_prompts
    rng = random.Random(f"{seed}-arrivals")
    times, t = [0.0], 0.0
    for _ in range(num_prompts - 1):
        t += rng.expovariate(rate)
        times.append(t)
    return times


def token_id_range(vocab_size: int) -> tuple[int, int]:
    """[lo, hi) of prompt token ids: clear of the special ids at both ends of the vocabulary."""
    margin = min(SPECIAL_ID_MARGIN, vocab_size // 8)  # tiny test vocabularies keep most ids
    if vocab_size - 2 * margin < 1:
        raise ValueError(f"vocabulary of {vocab_size} ids is too small for random prompts")
    return margin, vocab_size - margin


def make_requests(lengths: list[tuple[int, int]], arrivals: list[float], vocab_size: int,
                  token_seed: int | str) -> list[Request]:
    """Requests with random prompt ids of the given lengths, sent at the given times."""
    if len(lengths) != len(arrivals):
        raise ValueError(f"{len(lengths)} lengths for {len(arrivals)} arrival times")
    rng = random.Random(f"{token_seed}-tokens")
    lo, hi = token_id_range(vocab_size)
    return [Request([rng.randrange(lo, hi) for _ in range(num_in)], num_out, at)
            for (num_in, num_out), at in zip(lengths, arrivals)]


def shift_first_tokens(requests: list[Request], shift: int, vocab_size: int) -> list[Request]:
    """The same requests with each prompt's first id moved ``shift`` places (within the range
    `make_requests` draws from). A prefix cache keys every block on the ids before it, so none
    of these prompts can be served from the blocks the unshifted ones left in a server; the
    work (lengths, arrivals, every other id) is unchanged."""
    if shift == 0:
        return requests
    lo, hi = token_id_range(vocab_size)
    return [Request([lo + (r.prompt_ids[0] - lo + shift) % (hi - lo), *r.prompt_ids[1:]], r.output_len, r.arrival_s)
            if r.prompt_ids else r for r in requests]
