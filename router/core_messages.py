"""The messages between the front doors and the engine core, and their wire encoding.

Two local sockets join them (see `engine_core.py` for who binds what):

    front door ── PUSH ─▶ core "input" (PULL)     `AddRequest`, `AbortRequest`, `FrontDoorBeat`,
                                                   `Query`: one msgpack frame each
    core "output" (PUB) ─▶ SUB, one topic a door   `StepOutputs` (one message per engine step
                                                   and door: every request of that door the
                                                   step advanced), `QueryReply`
    core "output" (PUB) ─▶ SUB, topic ``b"*"``     `CoreBeat`: every `BEAT_S`, the groups' state

Every message is a `msgspec.Struct` tagged with its class name, so one decoder per direction
turns a frame back into the right type (an unknown or malformed frame raises `DecodeError`
and is dropped by the receiver; it never reaches the engine). Token ids travel as lists of
ints; text never reaches the core (the front doors tokenize and detokenize).
"""

from __future__ import annotations

import enum

import msgspec

from splitserve.router.messages import GroupStatus, ModelInfo
from splitserve.workers.sampling_params import SamplingParams

#: How often the core says it is alive (and the front doors do); a peer silent for
#: `DEAD_AFTER_S` is taken for dead.
BEAT_S = 0.1
DEAD_AFTER_S = 1.0
#: Front doors are given longer: a door busy tokenizing a long prompt must not lose its streams.
DOOR_DEAD_AFTER_S = 5.0
#: The PUB topic every door subscribes to besides its own.
ALL = b"*"


class QueryKind(str, enum.Enum):
    MODEL_INFO = "model_info"
    METRICS = "metrics"
    KV_STATE = "kv_state"


# ---- front door -> core -------------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag=True, frozen=True):
    door: str
    #: The caller's id; the core keys requests by (door, request_id), so doors never collide
    #: and a door can only abort its own.
    request_id: str
    prompt_token_ids: list[int]
    #: Without stop strings: they are the front door's (it sees the text).
    sampling: SamplingParams
    #: Seconds the core gives the request from its arrival there; it is aborted after.
    timeout_s: float
    #: Its prefix-cache partition (`splitserve.workers.cache_salt`): the request's own salt
    #: and/or the door's per-API-key one, already combined by the door; None: unsalted.
    cache_salt: str | None = None


class AbortRequest(msgspec.Struct, tag=True, frozen=True):
    door: str
    request_id: str


class FrontDoorBeat(msgspec.Struct, tag=True, frozen=True):
    door: str
    #: Front-door counters since the last beat: (api, method, code) -> count. The core sums
    #: them, so any door's /metrics shows every door's requests.
    counts: list[tuple[str, str, str, int]] = []


class Query(msgspec.Struct, tag=True, frozen=True):
    door: str
    query_id: int
    kind: QueryKind


# ---- core -> front door -------------------------------------------------------------------------


class RequestDelta(msgspec.Struct, tag=True, frozen=True, array_like=True):
    """What one step did to one request: new token ids, and how it ended if it did."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    #: An `ErrorCode` name when the request failed or was refused (then ``finished``).
    error_code: str | None = None
    error_message: str | None = None


class StepOutputs(msgspec.Struct, tag=True, frozen=True):
    outputs: list[RequestDelta]


class QueryReply(msgspec.Struct, tag=True, frozen=True):
    query_id: int
    model_info: ModelInfo | None = None
    metrics_text: bytes | None = None
    kv_state: dict | None = None
    error: str | None = None


class CoreBeat(msgspec.Struct, tag=True, frozen=True):
    #: Changes each time the core process starts: a door that sees a new one knows its
    #: requests there are gone.
    incarnation: str
    groups: list[GroupStatus]
    #: Requests the core holds (all doors).
    live_requests: int


ToCore = AddRequest | AbortRequest | FrontDoorBeat | Query
FromCore = StepOutputs | QueryReply | CoreBeat

_encoder = msgspec.msgpack.Encoder()
_to_core = msgspec.msgpack.Decoder(ToCore)
_from_core = msgspec.msgpack.Decoder(FromCore)
DecodeError = (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError)


def encode(message: ToCore | FromCore) -> bytes:
    return _encoder.encode(message)


def decode_to_core(frame: bytes) -> ToCore:
    return _to_core.decode(frame)


def decode_from_core(frame: bytes) -> FromCore:
    return _from_core.decode(frame)
