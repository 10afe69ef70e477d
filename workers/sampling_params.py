"""Per-request decoding options, checked once when the request arrives.

Lifecycle: a client builds a `SamplingParams` (directly, or from an OpenAI-style HTTP body); it is
validated in `__post_init__`, so bad input fails at admission with a `ValueError` and never reaches
the engine (docs/design.md invariant 4). From then on it is read-only: the sampler reads the
distribution knobs (temperature, top_k, top_p, min_p, seed, min_tokens, logprobs) every step, and
the stop checker reads the end conditions (max_tokens, stop, stop_token_ids, ignore_eos,
min_tokens, include_stop_str_in_output).

Semantics and defaults follow vLLM's `SamplingParams`, so its users meet no surprises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

# Below this temperature sampling is treated as argmax; dividing logits by ~0 would overflow.
_GREEDY_EPS = 1e-5

#: Highest temperature accepted. The sampler divides float32 logits by it: past ~1e4 every
#: distribution is already uniform to float32 precision, and past float32's max (3.4e38) the
#: temperature itself becomes inf, logits / inf is 0 or nan (a masked -inf logit), and a nan
#: row samples token 0 every step. So a larger value is refused rather than degenerating.
MAX_TEMPERATURE = 1e4

#: float32's smallest normal number (torch.finfo(torch.float32).tiny). The sampler compares
#: top_p and min_p in float32: a positive value below this is a subnormal or rounds to 0
#: (1e-46 does), and a top_p of 0 drops every token (token 0 then wins every draw). Such values
#: are clamped, which keeps their meaning exactly: a top_p this small keeps only the most
#: likely token, as it would in exact arithmetic; a min_p this small drops only probabilities
#: that are 0 in float32 anyway, as min_p = 0 does.
FLOAT32_TINY = 1.1754943508222875e-38


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop, for one request."""

    max_tokens: int = 16
    """Most tokens to generate (the request ends with finish_reason "length" there)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax), token-exact with HF transformers. At most
    `MAX_TEMPERATURE` (1e4): larger values are refused."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to >= top_p.
    A positive value below float32's smallest normal (`FLOAT32_TINY`) is clamped up to it."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 or 0 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's; 0 disables. A
    positive value below `FLOAT32_TINY` is clamped to 0 (the same tokens survive)."""
    seed: int | None = None
    """Per-request RNG seed: the same seed gives the same tokens whatever else is in the batch."""
    stop: tuple[str, ...] = ()
    """Strings that end generation when they appear in the output text. A str, list or None is
    accepted and normalised to a tuple."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (besides EOS). A list or None is accepted, as a tuple."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks use this to get a fixed output length)."""
    min_tokens: int = 0
    """EOS and stop_token_ids are masked, and stop strings ignored, until this many tokens exist."""
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top alternatives per step; None: none."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""

    def __post_init__(self) -> None:
        # Normalise the user-friendly forms (str, list, None) to tuples so the object stays
        # hashable and nobody can mutate it behind the engine's back.
        object.__setattr__(self, "stop", _as_str_tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", _as_int_tuple(self.stop_token_ids))
        self._check_lengths()
        self._check_distribution()
        self._check_stops()

    def _check_lengths(self) -> None:
        _require(_is_int(self.max_tokens) and self.max_tokens >= 1,
                 f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _require(_is_int(self.min_tokens) and self.min_tokens >= 0,
                 f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        _require(self.min_tokens <= self.max_tokens,
                 f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _require(self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
                 f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")

    def _check_distribution(self) -> None:
        t = self.temperature
        # `not t >= 0` is also true for nan, which would otherwise poison every probability.
        _require(_is_number(t) and t >= 0 and (isinstance(t, int) or math.isfinite(t)),
                 f"temperature must be a finite number >= 0, got {_short(t)}")
        _require(t <= MAX_TEMPERATURE,
                 f"temperature must be at most {MAX_TEMPERATURE:g} (beyond that sampling is uniform "
                 f"in float32 precision), got {_short(t)}")
        _require(_is_number(self.top_p) and 0 < self.top_p <= 1,
                 f"top_p must be in (0, 1], got {_short(self.top_p)}")
        _require(_is_int(self.top_k) and self.top_k >= -1,
                 f"top_k must be -1 (disabled), 0 (disabled) or a positive integer, "
                 f"got {self.top_k!r}")
        _require(_is_number(self.min_p) and 0 <= self.min_p <= 1,
                 f"min_p must be in [0, 1], got {_short(self.min_p)}")
        # Values float32 cannot hold (see FLOAT32_TINY): clamped to ones that select the
        # same tokens, as plain floats (an int 1 stays a number the sampler uploads as is).
        if self.top_p < FLOAT32_TINY:
            object.__setattr__(self, "top_p", FLOAT32_TINY)
        if 0 < self.min_p < FLOAT32_TINY:
            object.__setattr__(self, "min_p", 0.0)
        _require(self.seed is None or _is_int(self.seed),
                 f"seed must be None or an integer, got {self.seed!r}")

    def _check_stops(self) -> None:
        _require(all(s != "" for s in self.stop), "stop strings must not be empty")
        _require(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
                 f"stop_token_ids must be integers >= 0, got {list(self.stop_token_ids)!r}")

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax (temperature is effectively zero)."""
        return self.temperature < _GREEDY_EPS

    @classmethod
    def greedy(cls, **kwargs: Any) -> SamplingParams:
        """Greedy decoding (temperature 0); other fields as given."""
        return cls(temperature=0.0, **kwargs)

    def with_(self, **changes: Any) -> SamplingParams:
        """A validated copy with some fields changed (the object itself is frozen)."""
        return replace(self, **changes)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(x: object) -> bool:
    # bool is an int subclass; max_tokens=True is a bug, not a request for one token.
    return isinstance(x, int) and not isinstance(x, bool)


def _short(x: object) -> str:
    """A value for an error message, cut short (never echo a huge input back)."""
    if isinstance(x, int) and x.bit_length() > 128:  # repr of a huge int is slow, or refused
        return f"an integer of {x.bit_length()} bits"
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(x: object) -> bool:
    # An int is never nan (and math.isnan would overflow on a huge one).
    return (isinstance(x, (int, float)) and not isinstance(x, bool)
            and (isinstance(x, int) or not math.isnan(x)))


def _as_str_tuple(stop: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    items = tuple(stop)
    _require(all(isinstance(s, str) for s in items), f"stop must hold strings, got {stop!r}")
    return items


def _as_int_tuple(ids: list[int] | tuple[int, ...] | None) -> tuple[int, ...]:
    return () if ids is None else tuple(ids)
