"""What one worker group's engine offers the drivers above it, and nothing else.

`DisaggEngine` (workers/disagg_engine.py) and the router's loop and core (router/) drive each
worker group through this `GroupEngine` protocol; `LLMEngine` implements it. Its executor,
scheduler and block manager are its own: a caller that needs something of them asks the
engine (`kv_usage`, `poll_ranks`, the KV-link methods), so each keeps one owner.

Per role (`GroupRole`), the calls a driver makes in a request's life:

    any role   validate, add_request / abort_request / isolate, submit, ready, step,
               poll_ranks (a dead rank raises `WorkerGroupError` now), shutdown
    prefill    enable_kv_sends (once), add_prefill_request (the prompt, pushed when its last
               chunk runs), release (decode has the KV: free the held blocks)
    decode     reserve / cancel_reservation (blocks for a prompt still on prefill),
               admit_prefilled (run it from the first token), post_kv_receives /
               cancel_kv_receive (the ranks' side of a transfer)
    both ends  kv_layout (checked against the other side's first: block size, model shape,
               KV dtype, FP8 scales), start_kv_connect + finish_kv_connect (pairwise links: every end starts before
               any waits), has_transfer_events / poll_transfer_events / wait_handles
    failure    failure, step_failure, fail_all, blamed, lost_outputs
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from splitserve.kvtransfer.messages import KVLayout, KVRoute, RecvCommand, TransferEvent
    from splitserve.workers.config import ModelConfig
    from splitserve.workers.executor import StepError
    from splitserve.workers.outputs import RequestOutput
    from splitserve.workers.sampling_params import SamplingParams
    from splitserve.workers.sequence import Sequence


@dataclass(frozen=True)
class KVUsage:
    """A group's KV cache, as a policy or a status page sees it."""

    num_blocks: int
    num_free_blocks: int
    #: Fraction of blocks in use (0..1).
    usage: float
    #: Tokens per block.
    block_size: int


class GroupEngine(Protocol):
    # ---- what it serves ----
    model_cfg: ModelConfig
    max_model_len: int
    tokenizer: Any

    def tokenize(self, prompt: str | list[int]) -> list[int]: ...

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None: ...

    # ---- requests (any role) ----
    def add_request(self, request_id: str | None, prompt_ids: list[int], params: SamplingParams | None = None,
                    *, stream: bool = False, prompt: str | None = None, cache_salt: str | None = None) -> str: ...

    def abort_request(self, request_id: str) -> None: ...

    def has_request(self, request_id: str) -> bool: ...

    def isolate(self, request_id: str) -> None: ...

    # ---- prefill role ----
    def enable_kv_sends(self, hook: Any) -> None: ...

    def add_prefill_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, plan: Any,
                            cache_salt: str | None = None) -> None: ...

    def release(self, request_id: str) -> None: ...

    # ---- decode role ----
    def reserve(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                cache_salt: str | None = None) -> Sequence | None: ...

    def cancel_reservation(self, seq: Sequence) -> None: ...

    def admit_prefilled(self, seq: Sequence, first_token: int, logprobs: Any, *, stream: bool = False,
                        prompt: str | None = None) -> None: ...

    # ---- the KV links and transfers on the ranks ----
    def kv_layout(self) -> KVLayout: ...

    def start_kv_connect(self, routes: Seq[KVRoute], namespaces: Seq[str]) -> None: ...

    def finish_kv_connect(self, timeout_s: float) -> None: ...

    def post_kv_receives(self, commands: list[RecvCommand]) -> None: ...

    def cancel_kv_receive(self, transfer_id: int) -> None: ...

    def has_transfer_events(self) -> bool: ...

    def poll_transfer_events(self) -> list[TransferEvent]: ...

    def wait_handles(self) -> list: ...

    # ---- stepping ----
    @property
    def num_waiting(self) -> int: ...

    @property
    def num_running(self) -> int: ...

    @property
    def in_flight(self) -> bool: ...

    def kv_usage(self) -> KVUsage: ...

    def has_unfinished_requests(self) -> bool: ...

    def submit(self) -> None: ...

    def ready(self) -> bool: ...

    def poll_ranks(self) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    # ---- failure ----
    @property
    def failure(self) -> str | None: ...

    @property
    def step_failure(self) -> StepError | None: ...

    blamed: dict
    lost_outputs: dict

    def fail_all(self, reason: str, step_failure: StepError | None = None) -> None: ...

    def shutdown(self) -> None: ...
