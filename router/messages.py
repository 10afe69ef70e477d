"""Typed messages between the front doors (gRPC, HTTP, clients) and the router.

A request goes in as a `GenerateRequest`; what comes back is a stream of `Chunk`s, the last
with ``finished`` set; anything refused or failed is a `RouterError` whose `ErrorCode`
names the gRPC status (the HTTP front door maps the same codes to HTTP statuses).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from splitserve.workers.cache_salt import check_cache_salt
from splitserve.workers.sampling_params import SamplingParams


class ErrorCode(str, enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    INTERNAL = "INTERNAL"


class RouterError(Exception):
    """A request the router refused or could not serve, with the status the client gets."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code.value}: {message}")
        self.code, self.message = code, message

    def __reduce__(self):  # survives pickling through Ray with its fields
        return RouterError, (self.code, self.message)


def short(value: object, limit: int = 64) -> str:
    """``repr(value)``, cut to ``limit`` characters: error messages never echo a whole input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


@dataclass(frozen=True)
class GenerateRequest:
    """Exactly one of ``text``, ``token_ids`` and ``chat`` is the input."""

    request_id: str | None = None
    text: str | None = None
    token_ids: list[int] | None = None
    #: Chat messages ({"role", "content"}), rendered with the model's chat template.
    chat: list[dict[str, str]] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    #: Deadline of the whole request (seconds from arrival); None: the router's default.
    timeout_s: float | None = None
    #: Prefix-cache partition (vLLM's ``cache_salt``): the request reuses cached prompt blocks
    #: only of requests with the same salt, so ``cached_tokens`` counts only those hits.
    #: None: the shared cache (or only the door's per-key salt, `router.cache_salt`).
    cache_salt: str | None = None

    def check(self) -> None:
        inputs = [x for x in (self.text, self.token_ids, self.chat) if x is not None]
        if len(inputs) != 1:
            raise RouterError(ErrorCode.INVALID_ARGUMENT, "give exactly one input: text, token_ids or chat")
        if self.chat is not None and not (self.chat and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in self.chat)):
            raise RouterError(ErrorCode.INVALID_ARGUMENT, "chat must be a non-empty list of {role, content} strings")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise RouterError(ErrorCode.INVALID_ARGUMENT, f"timeout must be positive, got {self.timeout_s}")
        try:
            check_cache_salt(self.cache_salt)
        except ValueError as err:
            raise RouterError(ErrorCode.INVALID_ARGUMENT, str(err)) from None


@dataclass(frozen=True)
class Chunk:
    """What one engine step added to a request; the last one has ``finished`` set."""

    request_id: str
    #: Tokens and text new in this chunk.
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    #: Generated so far (all chunks up to this one).
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class GroupStatus:
    name: str
    role: str
    #: "ready", "failed" (out of every choice), or "restarting" (being rebuilt on Ray).
    state: str
    error: str | None
    num_waiting: int
    num_running: int
    kv_usage: float
    num_free_blocks: int
    num_blocks: int
    restarts: int


@dataclass(frozen=True)
class ModelInfo:
    model: str
    mode: str
    max_model_len: int
    vocab_size: int
    #: role -> (count, tp, pp)
    groups: dict[str, tuple[int, int, int]]


@dataclass(frozen=True)
class HealthInfo:
    """The service's health as a client sees it: ready only when every group serves."""

    ready: bool
    groups: list[GroupStatus]


@dataclass(frozen=True)
class Completion:
    """A whole request's result, gathered from its chunks (clients and the HTTP front door)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @classmethod
    def from_chunks(cls, request_id: str, chunks: list[Chunk]) -> "Completion":
        last = chunks[-1] if chunks else Chunk(request_id, [], "")
        return cls(request_id, "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids],
                   last.finish_reason, last.prompt_tokens, last.completion_tokens, last.cached_tokens)
