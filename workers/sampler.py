"""Turn last-position logits into next tokens, one batched call per engine step.

Lifecycle: the model runner produces `logits[B, V]` for the B sequences that sample this step (a
prefill chunk that does not end its prompt samples nothing and is not a row). The engine pairs each
row with a `SampleRequest` (its `SamplingParams`, its RNG and how many tokens it has produced) and
calls `Sampler()(logits, rows)`; the returned token ids (and optional logprobs) go to the
scheduler's postprocess, then to the detokenizer and the stop checker.

Per step, in order:
  1. raw logprobs, only if some row asked (vLLM's default: the model's own distribution, before
     min_tokens masking, temperature or filtering);
  2. min_tokens: EOS and stop_token_ids get -inf while a row is still short of min_tokens;
  3. greedy rows: `argmax` of the float32 logits, the very op HF `generate()` uses, so greedy output
     stays token-exact with transformers (docs/design.md invariant 1);
  4. random rows: temperature, top-k, top-p, min-p (vectorised across rows; one sort builds the
     top-k/top-p masks), then one draw per row by the exponential race `argmax(p / q)`,
     q ~ Exp(1), which picks token i with probability p_i. Unseeded rows share one draw from the
     global RNG; each seeded row draws from its own generator, so its tokens depend only on its
     seed and its own logits, not on its batch neighbours or its position.

The sampler holds no state, and neither does a seeded request: the generator of its n-th
token is derived from (seed, n) (`make_generator`), so preemption, moving to another batch,
or to another group (prefill samples the first token, decode the rest) changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.kernels.dispatch import upload
from splitserve.workers.sampling_params import SamplingParams


class SampleError(RuntimeError):
    """Sampling a step raised (after its forward: nothing of the step is left half done on
    other ranks or in flight to another group)."""


@dataclass
class SampleRequest:
    """One row of the logits: what the sampler needs to know about its sequence."""

    params: SamplingParams
    generator: torch.Generator | None
    """The request's own RNG when `params.seed` is set (from `make_generator`), else None."""
    num_output_tokens: int
    """Tokens this sequence has generated before this step (gates min_tokens)."""
    eos_token_ids: tuple[int, ...]
    """The model's EOS tokens (several for some models), masked while min_tokens is not reached."""


@dataclass
class TokenLogprobs:
    """Logprobs for one sampled token, from the model's raw distribution."""

    token_id: int
    logprob: float
    rank: int
    """Rank of the sampled token in the raw distribution: 1 = most likely."""
    top: dict[int, float]
    """The `params.logprobs` most likely token ids -> logprob (empty when logprobs=0)."""


@dataclass
class SamplerOutput:
    """Result of one step, aligned with the rows passed in."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    """Per row; None for rows whose params.logprobs is None."""


def make_generator(seed: int | None, device: torch.device | str = "cpu",
                   num_output_tokens: int = 0) -> torch.Generator | None:
    """The RNG for a seeded request's token number ``num_output_tokens``: a function of the seed
    and the position only. None (no seed) means the row uses the global RNG."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + num_output_tokens) % 2**63)


class PendingSample:
    """A step's sampled tokens on their way to the host.

    On CUDA the copy to pinned host memory is queued behind the step and an event marks its
    end, so the caller goes on (schedules the next step) while the GPU works; `result` waits
    for the event. On the CPU the tokens are already there."""

    def __init__(self, token_ids: torch.Tensor, logprobs: list[TokenLogprobs | None]):
        self.token_ids = token_ids  # on the device: the next step's placeholders come from here
        self._logprobs = logprobs
        self._event: torch.cuda.Event | None = None
        if token_ids.is_cuda:
            self._host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            self._host.copy_(token_ids, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(token_ids.device))
        else:
            self._host = token_ids

    def done(self) -> bool:
        return self._event is None or self._event.query()

    def result(self) -> SamplerOutput:
        if self._event is not None:
            self._event.synchronize()
        return SamplerOutput(self._host.tolist(), self._logprobs)


class Sampler:
    """Stateless batched sampler; see the module docstring for the order of operations."""

    def __call__(self, logits: torch.Tensor, rows: list[SampleRequest]) -> SamplerOutput:
        return self.sample(logits, rows).result()

    def sample(self, logits: torch.Tensor, rows: list[SampleRequest]) -> PendingSample:
        """Sample without waiting for the device (unless some row asked for logprobs). An
        exception raised here comes out as `SampleError`: the forward is over, so a rank whose
        sampling raised may go on serving (worker.py)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [len(rows)={len(rows)}, V], got {tuple(logits.shape)}"
            )
        try:
            logits = logits.float()  # no copy when already float32
            want_logprobs = any(r.params.logprobs is not None for r in rows)
            raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
            logits = _mask_min_tokens(logits, rows)
            token_ids = _sample(logits, rows)
            return PendingSample(token_ids, _gather_logprobs(raw_logprobs, token_ids, rows))
        except Exception as err:
            raise SampleError(f"{type(err).__name__}: {err}") from err


def _sample(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    """Next token per row, as a [B] int64 tensor on the logits' device."""
    greedy = [r.params.is_greedy for r in rows]
    if all(greedy):
        return logits.argmax(dim=-1)  # the fast path: one op, no copies
    token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    greedy_idx = upload([i for i, g in enumerate(greedy) if g], logits.device)
    random_idx = upload([i for i, g in enumerate(greedy) if not g], logits.device)
    if greedy_idx.numel():
        token_ids[greedy_idx] = logits[greedy_idx].argmax(dim=-1)
    random_rows = [r for r, g in zip(rows, greedy) if not g]
    token_ids[random_idx] = _sample_random(logits[random_idx], random_rows)
    return token_ids


def _mask_min_tokens(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    """-inf on EOS and stop_token_ids for rows still short of min_tokens, so they cannot end yet.

    Copies the logits only when some row needs masking: the common case stays copy-free."""
    rows_idx, cols_idx = [], []
    for i, r in enumerate(rows):
        if r.num_output_tokens >= r.params.min_tokens:
            continue
        ids = [*r.params.stop_token_ids, *r.eos_token_ids]
        ids = [t for t in ids if t < logits.shape[1]]  # an id past the vocab cannot be sampled
        rows_idx += [i] * len(ids)
        cols_idx += ids
    if not rows_idx:
        return logits
    masked = logits.clone()
    masked[upload(rows_idx, logits.device), upload(cols_idx, logits.device)] = float("-inf")
    return masked


def _sample_random(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then one draw per row; [R] token ids."""
    temperature = upload([r.params.temperature for r in rows], logits.device, logits.dtype)
    # Everything stays in vocabulary order (the sort only builds masks), so a seeded row's
    # probabilities and noise are bit-identical whatever its neighbours ask for.
    probs = (logits / temperature.unsqueeze(1)).softmax(dim=-1)
    probs = _apply_top_k_top_p(probs, rows)
    probs = _apply_min_p(probs, [r.params.min_p for r in rows])
    return _exponential_race(probs, [r.generator for r in rows])


def _apply_top_k_top_p(probs: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    """Zero the tokens that top-k or top-p drop, all rows at once (one sort, only if needed)."""
    vocab = probs.shape[1]
    top_k = [r.params.top_k if r.params.top_k > 0 else vocab for r in rows]
    # Rows without top-p get an unreachable threshold: cumulative sums that round up to 1.0
    # must not cut their tail.
    top_p = [r.params.top_p if r.params.top_p < 1.0 else float("inf") for r in rows]
    if all(k >= vocab for k in top_k) and all(p == float("inf") for p in top_p):
        return probs
    # stable: equal probabilities keep vocabulary order, so the cut is deterministic.
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    drop = _top_k_mask(sorted_probs, top_k)
    drop |= _top_p_mask(sorted_probs.masked_fill(drop, 0.0), top_p)
    return probs.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), 0.0)


def _top_k_mask(sorted_probs: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """True beyond each row's k-th position (k = vocab for rows without top-k)."""
    k = upload(top_k, sorted_probs.device).unsqueeze(1)
    position = torch.arange(sorted_probs.shape[1], device=sorted_probs.device).unsqueeze(0)
    return position >= k


def _top_p_mask(sorted_probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """True outside the smallest prefix whose share of the (top-k kept) mass reaches top_p.

    A token is dropped when the tokens before it already reach top_p; the first token has nothing
    before it (0 < top_p), so it always survives and no row is left empty."""
    p = upload(top_p, sorted_probs.device, sorted_probs.dtype).unsqueeze(1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return mass_before >= p * sorted_probs.sum(dim=-1, keepdim=True)


def _apply_min_p(probs: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Zero tokens less likely than min_p times the row's top token (which always survives)."""
    if not any(m > 0 for m in min_p):
        return probs
    m = upload(min_p, probs.device, probs.dtype).unsqueeze(1)
    threshold = probs.amax(dim=-1, keepdim=True) * m
    return probs.masked_fill(probs < threshold, 0.0)


def _exponential_race(
    probs: torch.Tensor, generators: list[torch.Generator | None]
) -> torch.Tensor:
    """argmax(p / q) with q ~ Exp(1) picks index i with probability p_i / sum(p): no need to
    renormalise after filtering.

    Rows without a generator share one draw from the global RNG; a seeded row draws a [V] vector
    from its own generator, so its result depends on nothing but its seed and its own logits."""
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        q = torch.empty_like(probs).exponential_()
    else:
        q = torch.empty_like(probs)
        if unseeded:
            idx = upload(unseeded, probs.device)
            q[idx] = torch.empty_like(probs[idx]).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            q[i].exponential_(generator=g)
    # Exp(1) can return exactly 0; 0/0 would be nan and argmax would return the nan's index.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


def _gather_logprobs(
    raw_logprobs: torch.Tensor | None, token_ids: torch.Tensor, rows: list[SampleRequest]
) -> list[TokenLogprobs | None]:
    """Sampled-token logprob, its rank and the top-n per row, from one topk over the batch."""
    if raw_logprobs is None:
        return [None] * len(rows)
    sampled = raw_logprobs.gather(1, token_ids.unsqueeze(1))
    # rank = 1 + how many tokens are strictly more likely (ties share the better rank).
    ranks = (raw_logprobs > sampled).sum(dim=-1) + 1
    n_max = min(max(r.params.logprobs or 0 for r in rows), raw_logprobs.shape[1])
    top_lp, top_ids = raw_logprobs.topk(n_max, dim=-1)
    sampled, ranks = sampled.squeeze(1).tolist(), ranks.tolist()
    top_lp, top_ids, ids = top_lp.tolist(), top_ids.tolist(), token_ids.tolist()
    out: list[TokenLogprobs | None] = []
    for i, r in enumerate(rows):
        n = r.params.logprobs
        if n is None:
            out.append(None)
            continue
        top = dict(zip(top_ids[i][:n], top_lp[i][:n]))
        out.append(TokenLogprobs(ids[i], sampled[i], ranks[i], top))
    return out
