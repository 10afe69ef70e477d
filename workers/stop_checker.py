"""Decide, after each new token, whether a request is finished and where its text ends.

Lifecycle, once per generated token of each sequence (after the sampler, in the engine's
postprocess):

    delta = detok.append([token_id])            # text made stable by this token
    decision = check_stop(params, output_token_ids, token_id, eos_token_ids,
                          detok.text, len(delta))
    if decision is not None:
        text = detok.text[:decision.truncate_to]   # slice with None keeps everything
        finish the sequence with decision.finish_reason / decision.stop_reason

Conditions, in priority order (as vLLM v1):
  0. nothing may stop the request within its first `min_tokens` tokens except max_tokens (the
     sampler already masks EOS and stop_token_ids there, this guards the text side too);
  1. EOS (unless `ignore_eos`)                  -> "stop", stop_reason None;
  2. a token in `stop_token_ids`                -> "stop", stop_reason = that token id;
  3. a stop string completed by the new text    -> "stop", stop_reason = that string;
  4. `max_tokens` reached                       -> "length", stop_reason None.
A stop string beats "length" on the same token: the text says why it ended.

`finish_reason` is "stop" | "length" | "abort"; this module never returns "abort": the engine sets
it when a client cancels or a request fails.

Streaming: a stop string can arrive split over several tokens, so text that could be the start of
one must not be sent yet. `stream_holdback(params)` says how many trailing characters of `text` to
keep back while the request runs (vLLM's stop buffer); all of it goes out when the request ends.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from splitserve.workers.sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class StopDecision:
    """Why a request ended, and how to cut its text."""

    finish_reason: FinishReason
    stop_reason: int | str | None = None
    """The stop token id or stop string that matched (vLLM's `stop_reason`); None for EOS and
    length."""
    truncate_to: int | None = None
    """Keep `text[:truncate_to]`: cuts a matched stop string (and what follows it), or a stop
    token's own text; None keeps the whole text."""


def check_stop(
    params: SamplingParams,
    output_token_ids: Sequence[int],
    new_token_id: int,
    eos_token_ids: Collection[int],
    text: str | None = None,
    new_text_len: int = 0,
) -> StopDecision | None:
    """Whether the sequence ends with `new_token_id`; None means generate on.

    output_token_ids: all generated tokens, `new_token_id` included as the last one.
    text, new_text_len: the detokenized output so far (`new_token_id`'s delta included) and that
        delta's length; only the tail that could hold a newly completed stop string is searched.
        Pass text=None when the request has no stop strings and the caller skips detokenizing.
    """
    num_tokens = len(output_token_ids)
    if num_tokens > params.min_tokens:
        decision = _check_token(params, new_token_id, eos_token_ids, text, new_text_len)
        decision = decision or check_stop_string(params, text, new_text_len)
        if decision is not None:
            return decision
    if num_tokens >= params.max_tokens:
        return StopDecision("length")
    return None


def stream_holdback(params: SamplingParams) -> int:
    """Characters at the end of the text to withhold from a running stream: enough to hide the
    beginning of a stop string that the next token may complete."""
    if not params.stop or params.include_stop_str_in_output:
        return 0
    return max(len(s) for s in params.stop) - 1


def _check_token(
    params: SamplingParams,
    token_id: int,
    eos_token_ids: Collection[int],
    text: str | None,
    new_text_len: int,
) -> StopDecision | None:
    if token_id in eos_token_ids and not params.ignore_eos:
        return StopDecision("stop", None, cut_token_text(params, text, new_text_len))
    if token_id in params.stop_token_ids:
        return StopDecision("stop", token_id, cut_token_text(params, text, new_text_len))
    return None


def cut_token_text(params: SamplingParams, text: str | None, new_text_len: int) -> int | None:
    # A stop token's own text is not part of the answer (vLLM drops it), unless asked to keep it.
    # EOS is usually a special token whose text is already skipped (new_text_len == 0).
    if text is None or new_text_len == 0 or params.include_stop_str_in_output:
        return None
    return len(text) - new_text_len


def check_stop_string(
    params: SamplingParams, text: str | None, new_text_len: int
) -> StopDecision | None:
    """The earliest stop string that ends inside the new text, if any.

    A stop string found earlier would have ended the request already, so a new match must overlap
    the delta: start searching len(stop) - 1 characters before it."""
    if not params.stop or not text or new_text_len <= 0:
        return None
    best: tuple[int, str] | None = None
    new_start = len(text) - new_text_len
    for stop in params.stop:
        index = text.find(stop, max(0, new_start - len(stop) + 1))
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    if best is None:
        return None
    index, stop = best
    end = index + len(stop) if params.include_stop_str_in_output else index
    return StopDecision("stop", stop, end)
