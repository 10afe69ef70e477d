"""Token ids -> text, one step at a time, emitting only text that later tokens cannot change.

Why not decode each token alone: byte-level BPE splits one character over several tokens (an emoji
is 4 bytes, often 2-4 tokens), and SentencePiece decodes a token's leading space differently at the
start of a string. So each step decodes a small window of recent tokens twice, without and with the
new ones, and emits the difference (the prefix_offset / read_offset technique of HF's
TextStreamer and vLLM):

    ids:  ... [prefix_offset ......... read_offset ......... end]
               `-- already emitted --'   `-- new tokens --'
    delta = decode(ids[prefix_offset:])[len(decode(ids[prefix_offset:read_offset])):]

If the window's text ends in U+FFFD (an incomplete UTF-8 sequence) or has not grown (a skipped
special token), nothing is emitted and the offsets stay put, so the next token decodes together
with the held-back ones. Otherwise the window slides forward: prefix_offset takes read_offset, and
read_offset the end.

Lifecycle: one `IncrementalDetokenizer` per request, made at admission from the prompt ids (the
last few prompt tokens give the first output token its context); `append(new_ids)` after every
step, whose delta is what streams to the client; `flush()` once when the request ends. For
byte-level tokenizers (the default SmolLM2 model) `text` then equals
`tokenizer.decode(output_ids, skip_special_tokens=...)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Prompt tokens kept as left context: enough for SentencePiece's leading-space rule and for a
# character split across the prompt/output boundary (vLLM uses the same number).
_PROMPT_CONTEXT = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Streams the output text of one request; see the module docstring."""

    def __init__(
        self, tokenizer: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ):
        """tokenizer: anything with HF's `decode(ids, skip_special_tokens=...)`."""
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Only a window of recent ids is kept; everything before prefix_offset is dropped.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""
        """The output text emitted so far (the sum of every returned delta)."""

    def append(self, token_ids: Sequence[int]) -> str:
        """Add newly generated tokens; return the text they made stable ("" if held back)."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._emit(new_text[len(prefix_text):])

    def flush(self) -> str:
        """At the end of the request: emit whatever is still held back, even an incomplete
        character (as U+FFFD, like `tokenizer.decode` of the whole output would)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text):
            return ""
        return self._emit(new_text[len(prefix_text):])

    def _emit(self, delta: str) -> str:
        self.text += delta
        # Slide the window: the tokens just decoded become the next step's prefix context.
        del self._ids[:self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
