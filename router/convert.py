"""Conversions between the gRPC messages (`splitserve_pb2`) and the router's typed messages.

Server side: `request_from_proto` turns proto3 zeros into the defaults documented in
``splitserve.proto`` and raises `RouterError` (INVALID_ARGUMENT) for bad values;
`responses_from_chunk`, `health_to_proto` and `model_info_to_proto` answer. Client side:
`request_to_proto`, `ChunkReader` (responses back to `Chunk`s), `health_from_proto` and
`model_info_from_proto`. Status codes map both ways by name (`grpc_status`, `error_code`).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from splitserve.router import splitserve_pb2 as pb
from splitserve.router.cache_salt import door_cache_salt
from splitserve.router.frontdoor import check_request
from splitserve.router.messages import (
    Chunk, ErrorCode, GenerateRequest, GroupStatus, HealthInfo, ModelInfo, RouterError,
)
from splitserve.workers.sampling_params import SamplingParams

#: max_tokens when a request leaves it 0 (OpenAI's completions default too).
DEFAULT_MAX_TOKENS = 16

Prompt = str | list[int] | list[dict[str, str]]


# ---- status codes ---------------------------------------------------------------------------

def grpc_status(code: ErrorCode) -> grpc.StatusCode:
    """Every `ErrorCode` is named after the gRPC status it stands for."""
    return grpc.StatusCode[code.value]


def error_code(status: grpc.StatusCode) -> ErrorCode:
    try:
        return ErrorCode(status.name)
    except ValueError:  # UNKNOWN, DATA_LOSS, ...: nothing the router sends on purpose
        return ErrorCode.INTERNAL


# ---- server side ----------------------------------------------------------------------------

def sampling_from_proto(s: pb.SamplingParams) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=s.max_tokens or DEFAULT_MAX_TOKENS, temperature=s.temperature, top_p=s.top_p or 1.0,
            top_k=s.top_k or -1, min_p=s.min_p, seed=s.seed if s.HasField("seed") else None,
            stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
            min_tokens=s.min_tokens)
    except ValueError as err:
        raise RouterError(ErrorCode.INVALID_ARGUMENT, f"sampling: {err}") from None


def request_from_proto(msg: pb.GenerateRequest, request_id: str, timeout_s: float | None,
                       tenant_key: str | None = None) -> GenerateRequest:
    """The router's request; ``request_id`` is the client's or one the server made up,
    ``timeout_s`` what is left of the call's deadline (None: none given), and ``tenant_key``
    the API key whose hash salts the request's prefix cache (per-key salting; None: off)."""
    which = msg.WhichOneof("input")
    if which is None:
        raise RouterError(ErrorCode.INVALID_ARGUMENT, "give exactly one input: text, token_ids or chat")
    chat = [{"role": m.role, "content": m.content} for m in msg.chat.messages] if which == "chat" else None
    request = GenerateRequest(
        request_id=request_id,
        text=msg.text if which == "text" else None,
        token_ids=list(msg.token_ids.ids) if which == "token_ids" else None,
        chat=chat, sampling=sampling_from_proto(msg.sampling), timeout_s=timeout_s,
        cache_salt=door_cache_salt(msg.cache_salt if msg.HasField("cache_salt") else None, tenant_key))
    return check_request(request)


def responses_from_chunk(chunk: Chunk) -> list[pb.GenerateResponse]:
    """A chunk's new tokens (if any), then `Complete` when it is the last."""
    out = []
    if chunk.token_ids or chunk.text:
        out.append(pb.GenerateResponse(chunk=pb.Chunk(token_ids=chunk.token_ids, text=chunk.text)))
    if chunk.finished:
        out.append(pb.GenerateResponse(complete=pb.Complete(
            finish_reason=chunk.finish_reason or "", prompt_tokens=chunk.prompt_tokens,
            completion_tokens=chunk.completion_tokens, cached_tokens=chunk.cached_tokens)))
    return out


def health_to_proto(health: HealthInfo) -> pb.HealthResponse:
    return pb.HealthResponse(ready=health.ready, groups=[pb.GroupHealth(
        name=g.name, role=g.role, state=g.state, error=g.error or "", num_waiting=g.num_waiting,
        num_running=g.num_running, kv_usage=g.kv_usage, num_free_blocks=g.num_free_blocks,
        num_blocks=g.num_blocks, restarts=g.restarts) for g in health.groups])


def model_info_to_proto(info: ModelInfo) -> pb.ModelInfoResponse:
    return pb.ModelInfoResponse(
        model=info.model, mode=info.mode, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
        groups=[pb.GroupLayout(role=role, count=c, tp=tp, pp=pp) for role, (c, tp, pp) in info.groups.items()])


# ---- client side ----------------------------------------------------------------------------

def request_to_proto(prompt: Prompt, params: SamplingParams, request_id: str = "",
                     cache_salt: str | None = None) -> pb.GenerateRequest:
    """A request for ``prompt``: text, token ids, or chat messages ({"role", "content"});
    ``cache_salt``: its prefix-cache partition (unset when None)."""
    if params.logprobs is not None or params.include_stop_str_in_output:
        raise ValueError("logprobs and include_stop_str_in_output are not part of the gRPC API")
    sampling = pb.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        min_p=params.min_p, stop=params.stop, stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos, min_tokens=params.min_tokens)
    if params.seed is not None:
        sampling.seed = params.seed
    msg = pb.GenerateRequest(request_id=request_id, sampling=sampling)
    if cache_salt is not None:
        msg.cache_salt = cache_salt
    if isinstance(prompt, str):
        msg.text = prompt
    elif prompt and all(isinstance(m, dict) for m in prompt):
        msg.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)
    elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        msg.token_ids.ids.extend(prompt)
    else:
        raise ValueError("a prompt is a string, a list of token ids, or a list of chat messages")
    return msg


@dataclass
class ChunkReader:
    """Turns one stream's responses back into `Chunk`s (the `Complete` as the finished one)."""

    request_id: str
    completion_tokens: int = 0

    def read(self, resp: pb.GenerateResponse) -> Chunk:
        if resp.WhichOneof("kind") == "chunk":
            ids = list(resp.chunk.token_ids)
            self.completion_tokens += len(ids)
            return Chunk(self.request_id, ids, resp.chunk.text, completion_tokens=self.completion_tokens)
        c = resp.complete
        return Chunk(self.request_id, [], "", True, c.finish_reason or None, c.prompt_tokens,
                     c.completion_tokens, c.cached_tokens)


def health_from_proto(msg: pb.HealthResponse) -> HealthInfo:
    return HealthInfo(msg.ready, [GroupStatus(
        g.name, g.role, g.state, g.error or None, g.num_waiting, g.num_running, g.kv_usage, g.num_free_blocks,
        g.num_blocks, g.restarts) for g in msg.groups])


def model_info_from_proto(msg: pb.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(msg.model, msg.mode, msg.max_model_len, msg.vocab_size,
                     {g.role: (g.count, g.tp, g.pp) for g in msg.groups})
