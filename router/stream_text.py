"""One request's text on its front door: incremental detokenization and stop strings.

The engine core sends token ids only; the front door that owns a request turns them into text
here, in its own process, so neither a slow tokenizer nor a long stop list can stall a step.
The rules are the engine's (`workers/stop_checker.py`), applied in the same order, so a
served request ends on the same token with the same text as the offline engine:

    EOS or a stop token id        the core ends the request ("stop"); the token's own text is
                                  dropped unless ``include_stop_str_in_output``
    a stop string                 checked here after each token (past ``min_tokens``); the
                                  request ends on the token that completes it, its text cut
                                  there; the door then aborts it in the core
    max_tokens / model length     the core ends it ("length"); a stop string completed by the
                                  same token wins

Lifecycle: one `StreamText` per request, `add(token_ids, core_finish)` each time the stream's
consumer takes its buffered tokens (several steps' worth when it reads slowly), until the
returned `TextUpdate` says ``finish_reason``.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.workers.detokenizer import IncrementalDetokenizer
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.stop_checker import StopDecision, check_stop_string, cut_token_text, stream_holdback


@dataclass(frozen=True)
class TextUpdate:
    #: The tokens that belong to the answer (those after a matched stop string do not).
    token_ids: list[int]
    #: Text new since the previous update (withheld text that may start a stop string excluded).
    text: str
    #: Set once the request has ended: "stop" | "length".
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class StreamText:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.params = params
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids) if tokenizer is not None else None
        self._holdback = stream_holdback(params)
        self._sent_chars = 0
        self.num_tokens = 0

    def add(self, token_ids: list[int], core_finish: str | None) -> TextUpdate:
        """Take the tokens the core sent since the last call; ``core_finish`` is its finish
        reason when these tokens end the request there."""
        for i, token in enumerate(token_ids):
            self.num_tokens += 1
            delta = self._detok.append([token]) if self._detok is not None else ""
            last = i == len(token_ids) - 1
            counts = self.num_tokens > self.params.min_tokens
            if last and core_finish == "stop":  # EOS or a stop token: it beats a stop string
                return self._end(token_ids, cut_token_text(self.params, self._text(), len(delta)),
                                 StopDecision("stop"))
            if counts and self._detok is not None:
                decision = check_stop_string(self.params, self._detok.text, len(delta))
                if decision is not None:
                    return self._end(token_ids[:i + 1], decision.truncate_to, decision)
        if core_finish is not None:
            return self._end(token_ids, None, StopDecision(core_finish))
        text = self._text()
        visible = text[: max(0, len(text) - self._holdback)]
        return TextUpdate(list(token_ids), self._take(visible))

    def _end(self, token_ids: list[int], truncate_to: int | None, decision: StopDecision) -> TextUpdate:
        if self._detok is not None:
            self._detok.flush()
        text = self._text()[:truncate_to]
        return TextUpdate(list(token_ids), self._take(text), decision.finish_reason, decision.stop_reason)

    def _text(self) -> str:
        return self._detok.text if self._detok is not None else ""

    def _take(self, text: str) -> str:
        new = text[self._sent_chars:]
        self._sent_chars = max(self._sent_chars, len(text))
        return new
