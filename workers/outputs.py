"""What the engine hands back for a request: a snapshot after each step it advanced."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.workers.sampler import TokenLogprobs


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    #: Generated tokens so far (all of them).
    token_ids: list[int]
    #: Generated text so far ("" when the model has no tokenizer).
    text: str
    finished: bool
    #: "stop" | "length" | "abort" once finished, else None.
    finish_reason: str | None = None
    #: The stop string or stop token id that ended the request, if any.
    stop_reason: int | str | None = None
    #: Per generated token when the request asked for logprobs.
    logprobs: list[TokenLogprobs | None] | None = None
    #: Prompt tokens served from the prefix cache.
    num_cached_tokens: int = 0
    #: Tokens and text new since the previous output of this request (streaming).
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    prompt: str | None = None
    #: Why the request failed (finish_reason "abort"), when it did not just get cancelled.
    error: str | None = None
    #: The status a server answers such a failure with, when it is not the service's to retry
    #: (None: UNAVAILABLE): "INTERNAL" for a request that made the model raise (a query of death).
    error_code: str | None = None
