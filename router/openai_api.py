"""The OpenAI API's shapes: request bodies in, response bodies and stream events out.

A body is parsed by pydantic (strict types: ``"5"`` is not a number), then `prompts` and
`sampling` turn it into the router's inputs: bad values raise `RouterError`
(INVALID_ARGUMENT) naming the field, and options splitserve does not implement (``n`` > 1,
logprobs, penalties, ``echo`` ...) are refused rather than silently ignored. OpenAI fields
that change nothing here (``user``, ``metadata``, ``store`` ...: `_IGNORED`) are accepted;
any other unknown field is refused (a typo must not silently fall back to a default).
Error messages quote at most a short prefix of a value. The responses are built by `completion_body` /
`chat_body` (whole) and `completion_event` / `chat_event` (one stream chunk each).

Extensions beyond OpenAI's fields (vLLM's names where it has them): ``top_k``, ``min_p``,
``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``return_token_ids`` (each choice gets its
``token_ids``), ``timeout_s`` (the request's deadline in seconds), ``cache_salt`` (a non-empty
string: the request reuses prefix-cache blocks only of requests with the same salt, so
``usage.prompt_tokens_details.cached_tokens`` counts only those; see
`splitserve.workers.cache_salt`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from splitserve.router.messages import Chunk, Completion, ErrorCode, RouterError, short
from splitserve.workers.sampling_params import SamplingParams

Prompt = str | list[int]

# Integers in the ranges of the gRPC API's fields: a number past them cannot be meant, and the
# engine need not handle it (a top_k past int64 would fail a whole step).
UInt32 = Annotated[int, Field(ge=0, lt=2**32)]
Int32 = Annotated[int, Field(ge=-2**31, lt=2**31)]

#: Options refused unless they hold their neutral value.
_UNSUPPORTED = {"n": (None, 1), "best_of": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
                "echo": (None, False), "suffix": (None, ""), "presence_penalty": (None, 0),
                "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
                "response_format": (None, {"type": "text"})}


#: OpenAI fields accepted and ignored: they describe the caller or the account, not the output.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "tool_choice",
                      "prediction", "modalities", "audio", "reasoning_effort", "web_search_options"})


def invalid(message: str) -> RouterError:
    return RouterError(ErrorCode.INVALID_ARGUMENT, message)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class _Body(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    max_tokens: Int32 | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int32 | None = None
    min_p: float | None = None
    seed: Annotated[int, Field(ge=-2**63, lt=2**64)] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[UInt32] | None = None
    ignore_eos: bool = False
    min_tokens: Int32 = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    timeout_s: float | None = None
    cache_salt: str | None = None

    def check_supported(self) -> None:
        extra = self.model_extra or {}
        for name, neutral in _UNSUPPORTED.items():
            value = extra.get(name)
            if value not in neutral:
                raise invalid(f"{name}={short(value)} is not supported by this server")
        unknown = sorted(name for name in extra if name not in _UNSUPPORTED and name not in _IGNORED)
        if unknown:
            raise invalid(f"unknown field{'s' if len(unknown) > 1 else ''}: "
                          f"{', '.join(short(n, 40) for n in unknown[:5])}")

    def sampling(self, default_max_tokens: int | None) -> SamplingParams:
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=-1 if self.top_k is None else self.top_k,
                min_p=self.min_p or 0.0, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos, min_tokens=self.min_tokens)
        except ValueError as err:
            raise invalid(str(err)) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]

    def prompts(self) -> list[Prompt]:
        """One prompt (text or token ids) or several; never empty."""
        p = self.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise invalid("prompt is empty: give a string, a list of token ids, or a list of either")
        return prompts


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    #: A string, or OpenAI's list of parts (only {"type": "text"} parts are understood).
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if not all(part.get("type") == "text" and isinstance(part.get("text"), str) for part in self.content):
            raise invalid("messages: only text content parts are supported")
        return "".join(part["text"] for part in self.content)


class ChatRequest(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: Int32 | None = None

    def chat(self) -> list[dict[str, str]]:
        if not self.messages:
            raise invalid("messages is empty: give at least one {role, content} message")
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def sampling(self, default_max_tokens: int | None) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            return self.model_copy(update={"max_tokens": self.max_completion_tokens}).sampling(default_max_tokens)
        return super().sampling(default_max_tokens)


# ---- responses ------------------------------------------------------------------------------

def usage(results: list[Completion] | list[Chunk]) -> dict[str, Any]:
    """Totals over the requests (their `Completion`s, or their streams' finished chunks)."""
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in results)}}


def _head(request_id: str, obj: str, created: int, model: str) -> dict[str, Any]:
    return {"id": request_id, "object": obj, "created": created, "model": model}


def completion_body(request_id: str, created: int, model: str, results: list[Completion],
                    token_ids: bool) -> dict[str, Any]:
    choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason,
                **({"token_ids": r.token_ids} if token_ids else {})} for i, r in enumerate(results)]
    return {**_head(request_id, "text_completion", created, model), "choices": choices, "usage": usage(results)}


def chat_body(request_id: str, created: int, model: str, results: list[Completion], token_ids: bool) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                "finish_reason": r.finish_reason, **({"token_ids": r.token_ids} if token_ids else {})}
               for i, r in enumerate(results)]
    return {**_head(request_id, "chat.completion", created, model), "choices": choices, "usage": usage(results)}


def completion_event(request_id: str, created: int, model: str, choices: list[dict[str, Any]],
                     include_usage: bool, usage_: dict[str, Any] | None = None) -> dict[str, Any]:
    """One stream chunk; with ``include_usage`` every chunk has ``usage`` (null but the last)."""
    event = {**_head(request_id, "text_completion", created, model), "choices": choices}
    return {**event, "usage": usage_} if include_usage else event


def chat_event(request_id: str, created: int, model: str, choices: list[dict[str, Any]],
               include_usage: bool, usage_: dict[str, Any] | None = None) -> dict[str, Any]:
    event = {**_head(request_id, "chat.completion.chunk", created, model), "choices": choices}
    return {**event, "usage": usage_} if include_usage else event


def completion_choice(index: int, text: str, token_ids: list[int] | None, finish_reason: str | None) -> dict:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {**choice, "token_ids": token_ids} if token_ids is not None else choice


def chat_choice(index: int, delta: dict[str, str], token_ids: list[int] | None, finish_reason: str | None) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {**choice, "token_ids": token_ids} if token_ids is not None else choice

