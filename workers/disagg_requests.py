"""The disaggregated engine's requests: the line they wait in, and what their client has seen.

`RequestBook` owns every request between `DisaggEngine.add_request` and its last output:

    add          the request is live and joins the back of the line
    next_queued  the engine places the request at the front (`push_front` if it must wait:
                 first come, first served)
    on a group   `DisaggRequest.decode` names the group it generates on, once admitted
    lost         its group or its transfer is lost: `retry` puts it at the front again (up to
                 ``max_retries``), after `carry_over` kept the tokens a lost decode group had
                 generated (the continuation's prompt)
    emit         a decode group's output, stitched after the tokens of groups it lost and
                 counted from what the client was given
    fail         it ends with finish_reason "abort" and an error
    outputs      `take_outputs` hands the step's outputs to the caller

A request is live until its finished output is emitted (or it fails); the book is the one
writer of that state.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from splitserve.workers.outputs import RequestOutput
from splitserve.workers.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class DisaggRequest:
    """A request as the client gave it, plus what it has generated on a group it lost."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    prompt: str | None
    queued_at: float
    #: Tokens generated on decode groups that were lost since (the prompt of the continuation).
    done_ids: list[int] = field(default_factory=list)
    done_text: str = ""
    retries: int = 0
    #: In a batch that raised with others: runs whole on a decode group, isolated.
    suspect: bool = False
    #: The group it generates on, once admitted there (a `Group`).
    decode: Any = None
    #: Tokens and characters of text the client has been given (`RequestBook.emit`).
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    #: Its prefix-cache partition on every group it reaches (`Sequence.cache_salt`).
    cache_salt: str | None = None

    def continuation(self) -> tuple[list[int], SamplingParams]:
        """Prompt and params that generate the rest: prompt + tokens so far, fewer to go."""
        n = len(self.done_ids)
        if not n:
            return self.prompt_ids, self.params
        return self.prompt_ids + self.done_ids, self.params.with_(
            max_tokens=self.params.max_tokens - n, min_tokens=max(0, self.params.min_tokens - n))


class RequestBook:
    def __init__(self, max_retries: int):
        self.max_retries = max_retries
        self._queue: deque[DisaggRequest] = deque()
        self._live: dict[str, DisaggRequest] = {}
        self._outputs: list[RequestOutput] = []
        #: Requests sent through again after losing a group (prefill re-sends and decode
        #: migrations); the router reports it, tests check a fault really moved requests.
        self.num_resent = 0

    # ---- lookups ---------------------------------------------------------------------------

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._live

    def get(self, request_id: str) -> DisaggRequest | None:
        return self._live.get(request_id)

    def on_group(self, group: Any) -> list[DisaggRequest]:
        """The live requests generating on ``group``."""
        return [r for r in self._live.values() if r.decode is group]

    @property
    def num_live(self) -> int:
        return len(self._live)

    def has_unfinished(self) -> bool:
        """Live requests, or outputs not handed out yet."""
        return bool(self._live or self._outputs)

    def is_queued(self, request: DisaggRequest) -> bool:
        return request in self._queue

    # ---- the line --------------------------------------------------------------------------

    def add(self, request: DisaggRequest) -> None:
        self._live[request.request_id] = request
        self._queue.append(request)

    def next_queued(self) -> DisaggRequest | None:
        return self._queue.popleft() if self._queue else None

    def push_front(self, request: DisaggRequest) -> None:
        self._queue.appendleft(request)

    def unqueue(self, request: DisaggRequest) -> None:
        self._queue.remove(request)

    def retry(self, request: DisaggRequest, reason: str) -> bool:
        """Send the request through again, first in line; False (nothing done) once it has been
        re-sent ``max_retries`` times: the caller fails it."""
        request.retries += 1
        if request.retries > self.max_retries:
            return False
        logger.warning("re-sending request %s (%s)", request.request_id, reason)
        self.num_resent += 1
        request.queued_at = time.monotonic()
        self._queue.appendleft(request)
        return True

    def carry_over(self, request: DisaggRequest, tokens: list[int], tokenizer: Any) -> None:
        """Its decode group is lost after generating ``tokens`` (some perhaps never reported):
        they become part of the continuation's prompt and come first in its next output."""
        request.decode = None
        request.done_ids = request.done_ids + tokens
        if tokens and tokenizer is not None:
            request.done_text = tokenizer.decode(request.done_ids, skip_special_tokens=True)

    # ---- outputs ---------------------------------------------------------------------------

    def emit(self, out: RequestOutput) -> None:
        """A decode group's output, as the client sees it (tokens from lost groups first).
        What is new is counted from what the client was given, not from the group's view: a
        lost group may have generated tokens it never reported (the first token of a request
        admitted just before the group died), and they come first in the next output."""
        request = self._live.get(out.request_id)
        if request is None:
            return
        if request.done_ids:
            out.token_ids = request.done_ids + out.token_ids
            out.text = request.done_text + out.text
            out.prompt_token_ids = request.prompt_ids
            if out.logprobs is not None:
                out.logprobs = [None] * len(request.done_ids) + out.logprobs
        out.new_token_ids = out.token_ids[request.num_sent_tokens:]
        out.new_text = out.text[request.num_sent_chars:]
        request.num_sent_tokens, request.num_sent_chars = len(out.token_ids), len(out.text)
        if out.finished:
            del self._live[out.request_id]
        self._outputs.append(out)

    def fail(self, request: DisaggRequest, reason: str, code: str | None = None) -> None:
        """The request ends with an error (``code``: `RequestOutput.error_code`) and what it had
        generated on groups it lost."""
        self._live.pop(request.request_id, None)
        self._outputs.append(RequestOutput(
            request_id=request.request_id, prompt_token_ids=request.prompt_ids, token_ids=list(request.done_ids),
            text=request.done_text, finished=True, finish_reason="abort", error=reason, error_code=code,
            prompt=request.prompt))

    def take_outputs(self) -> list[RequestOutput]:
        outputs, self._outputs = self._outputs, []
        return outputs
