"""Executors: how the engine's `StepBatch` reaches the model, in this process or in a group.

- `LocalExecutor`: one rank, in the engine's own process (tp = pp = 1): no copies, no IPC.
- `WorkerGroupExecutor` (`worker_group.py`): tp x pp rank processes.

Both are built from one `RunnerSpec` (everything a rank needs to build its runner, picklable)
by `make_executor`; `build_runner` is the one place a rank's runner is assembled.

A step whose computation raises: an exception the rank can survive (`step_failure_is_fatal`
says which: a Python exception of a one-rank group, or of sampling) comes back from `collect`
in that batch's place as `StepError`, and the rank goes on serving: only the batch is lost. Any
other ends the rank, and so the group: `WorkerGroupError`, whose ``step_failure`` names the
step. Either way the engine learns which batch raised, and so whose requests (engine.py).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from splitserve.kvtransfer.agent import KVAgentSpec, KVTransferAgent
from splitserve.kvtransfer.messages import KVRoute, RankKVScales, RecvCommand, TransferEvent
from splitserve.workers import kv_scales
from splitserve.workers.config import ModelConfig, ParallelConfig
from splitserve.workers.kv_cache import KVCacheSpec
from splitserve.workers.model_runner import ModelRunner
from splitserve.workers.parallel import ParallelState
from splitserve.workers.quant_config import QuantConfig
from splitserve.workers.rank_messages import ControlMessage, KVCancel, KVConnect, KVConnected, KVRecv
from splitserve.workers.sampler import PendingSample, SampleError, SamplerOutput
from splitserve.workers.step_batch import StepBatch
from splitserve.workers.weights import iter_safetensors


class StepError(RuntimeError):
    """A rank raised a Python exception while computing one step and went on serving: only
    that step's batch is lost (the group is not). The engine finds whose request it was."""

    def __init__(self, step_id: int, message: str):
        super().__init__(f"step {step_id} raised on the ranks: {message}")
        self.step_id, self.message = step_id, message


class WorkerGroupError(RuntimeError):
    """A rank of the worker group died, hung past its deadline or raised where it could not
    go on. ``step_failure``: the step whose exception ended it, when one did."""

    def __init__(self, message: str, step_failure: StepError | None = None):
        super().__init__(message)
        self.step_failure = step_failure


#: Test-only fault injection (unset in service): "<id>[:sample],...": a rank whose step has
#: one of these tokens among its input ids raises before the forward, or, with ":sample", after
#: it, as its sampling would (`SampleError`). Read when a runner is built: a runner built while
#: it is unset has no hook at all.
RAISE_ON_TOKEN_ENV = "SPLITSERVE_TEST_RAISE_ON_TOKEN"


class InjectedStepFault(RuntimeError):
    """Raised by the `RAISE_ON_TOKEN_ENV` hook."""


def describe_error(err: BaseException, limit: int = 500) -> str:
    """One line for a client or a log: type and message, cut short (a message may quote input)."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def step_failure_is_fatal(err: BaseException, batch: StepBatch, spec: RunnerSpec, world_size: int,
                          tp_size: int) -> str | None:
    """Why an exception raised while computing ``batch`` must end the rank (its group is then
    rebuilt), or None when the rank can go on serving and only the batch is lost:
    - anything but an `Exception`, and device errors (a CUDA error poisons the context);
    - with several ranks, any exception but one of sampling on the output rank: a rank that
      raised mid-forward leaves its peers in a collective that never completes (sampling comes
      after every collective, unless its tokens are shared over the tp group);
    - a step pushing KV to a decode group that raised mid-forward: part of its messages never
      leave, and a receiver matching messages by order (NCCL) would be out of step for good."""
    if not isinstance(err, Exception):
        return f"{type(err).__name__} is not an Exception"
    if any(_device_error(e) for e in (err, err.__cause__) if e is not None):
        return "the device reported an error"
    sampled = isinstance(err, SampleError)
    shares = spec.async_scheduling and tp_size > 1
    if world_size > 1 and not (sampled and not shares):
        return f"a rank of {world_size} raised mid-step: its peers may wait in a collective"
    if batch.kv_sends and not sampled:
        return "it raised while sending KV to a decode group"
    return None


#: What torch.distributed says when the other end of a collective or a pairwise link is gone
#: (gloo's TCP transport; NCCL and the store raise `DistNetworkError` / `DistBackendError`).
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def peer_lost(err: BaseException) -> bool:
    """The exception is a peer rank's loss seen from this one (a collective or a link whose
    other end died), not anything the batch did: the rank ends like its peer, and no request
    is blamed for it (a query-of-death verdict would fail an innocent request alone in its
    batch, or isolate a whole batch, for a rank that was killed)."""
    import torch.distributed as dist

    network = tuple(k for k in (getattr(dist, "DistNetworkError", None), getattr(dist, "DistBackendError", None)) if k)
    for e in (err, err.__cause__):
        if e is not None and (isinstance(e, network) or any(m in str(e) for m in _PEER_GONE)):
            return True
    return False


def _device_error(err: BaseException) -> bool:
    text = str(err)
    return (type(err).__name__ == "AcceleratorError" or "CUDA error" in text or "device-side assert" in text
            or "NCCL" in text)


def _fault_hook(runner: ModelRunner) -> None:
    """Wrap ``runner.execute_async`` with the `RAISE_ON_TOKEN_ENV` hook, if it is set."""
    value = os.environ.get(RAISE_ON_TOKEN_ENV, "")
    if not value:
        return
    poisons = {int(token): where == "sample" for token, _, where in (v.partition(":") for v in value.split(","))}
    execute = runner.execute_async

    def execute_async(batch: StepBatch):
        hit = poisons.keys() & set(batch.input_ids)
        if not hit:
            return execute(batch)
        token = min(hit)
        message = f"fault injection: token {token} in step {batch.step_id}"
        if not poisons[token]:
            raise InjectedStepFault(message)
        execute(batch)  # the forward (and its KV sends) done, as before a real sampling error
        raise SampleError(message)

    runner.execute_async = execute_async


@dataclass(frozen=True)
class RunnerSpec:
    model_cfg: ModelConfig
    #: Folder of *.safetensors; None for random weights drawn from ``seed``.
    weights_dir: Path | None
    seed: int
    num_blocks: int
    block_size: int
    dtype: torch.dtype
    #: "cpu" or "cuda": rank r of a group takes cuda:<device_index + device_offset + local_rank>.
    device_type: str
    #: The engine's CUDA device ("cuda:1" -> 1; None -> 0).
    device_index: int | None
    eos_token_ids: tuple[int, ...]
    show_progress: bool = True
    #: The rank's part in the KV transfer service (disaggregated mode); None otherwise.
    kv: KVAgentSpec | None = None
    #: GPUs taken by groups placed before this one (a decode group after its prefill group).
    device_offset: int = 0
    #: Async scheduling: a later step's placeholders take this step's samples on every rank.
    async_scheduling: bool = False
    #: The KV cache's element type; None: the model's (``dtype``). FP8 brings scales.
    kv_dtype: torch.dtype | None = None
    #: FP8 weights (workers/quant_config.py); None: the model's dtype throughout.
    quant: QuantConfig | None = None
    #: The scheduler's step budget: start-up compiles the kernels for steps up to it
    #: (`ModelRunner.warm_up`; 0: attention's variants only).
    max_num_batched_tokens: int = 0


def rank_device(spec: RunnerSpec, parallel: ParallelState) -> torch.device:
    if spec.device_type == "cpu":
        return torch.device("cpu")
    index = (spec.device_index or 0) + spec.device_offset + parallel.mapping.local_rank
    return torch.device("cuda", index % max(1, torch.cuda.device_count()))


def build_runner(spec: RunnerSpec, parallel: ParallelState,
                 report: Callable[[TransferEvent], None] | None = None) -> ModelRunner:
    """This rank's runner; with ``spec.kv`` also its KV transfer agent, reporting to ``report``."""
    device = rank_device(spec, parallel)
    if device.type == "cuda":  # libraries that use "the current device" (NCCL, Triton) use this one
        torch.cuda.set_device(device)
    m, cfg = parallel.mapping, spec.model_cfg
    kv = KVCacheSpec.for_rank(cfg, m, spec.num_blocks, spec.block_size, spec.dtype, spec.kv_dtype)
    progress = spec.show_progress and m.rank == 0
    weights = None if spec.weights_dir is None else iter_safetensors(spec.weights_dir, progress)
    runner = ModelRunner.create(cfg, parallel, kv, device, spec.eos_token_ids, weights, spec.seed,
                                share_samples=spec.async_scheduling, quant=spec.quant,
                                warm_up_tokens=spec.max_num_batched_tokens, progress=progress)
    if spec.kv is not None:
        runner.agent = KVTransferAgent(spec.kv, m.rank, runner.kv_cache.transfer_data, m.pp_layers(cfg.num_layers).start,
                                       m.kv_heads(cfg.num_kv_heads).start, report)
    _fault_hook(runner)
    return runner


def rank_kv_scales(runner: ModelRunner, spec: RunnerSpec) -> RankKVScales | None:
    """The rank's slice of an FP8 cache's scales, for the driver's layout check (None: unscaled)."""
    if runner.kv_cache.scales is None:
        return None
    m, cfg = runner.parallel.mapping, spec.model_cfg
    return kv_scales.rank_scales(runner.kv_cache.scales.cpu(), m.pp_layers(cfg.num_layers).start,
                                 m.kv_heads(cfg.num_kv_heads).start)


def handle_control(runner: ModelRunner, message: ControlMessage) -> KVConnected | None:
    """Apply a control message to a rank's KV agent; returns the reply, if one is owed."""
    match message:
        case KVConnect(routes=routes, namespaces=namespaces):
            runner.agent.connect(routes, namespaces)
            return KVConnected()
        case KVRecv(commands=commands):
            runner.agent.post_recv(commands)
        case KVCancel(transfer_id=transfer_id):
            runner.agent.cancel(transfer_id)
        case _:
            raise TypeError(f"not a message a rank knows: {message!r}")
    return None


class Executor(Protocol):
    """Batches are collected in the order they were submitted; KV transfer commands
    (`kv_connect`, `kv_recv`, `kv_cancel`) reach every rank in order with the batches; rank
    events come back through `poll_events`."""

    def submit(self, batch: StepBatch) -> None: ...

    def collect(self) -> SamplerOutput: ...

    def ready(self) -> bool: ...

    def has_events(self) -> bool: ...

    def wait_handles(self) -> list: ...

    def kv_connect(self, routes: list[KVRoute], namespaces: list[str]) -> None:
        """Every rank starts building its links to the other side's groups (named by their
        namespaces); `wait_kv_connected` waits until they have. Two calls, because both ends
        of a link connect together: a driver starts every group before it waits for one."""
        ...

    def wait_kv_connected(self, timeout_s: float) -> None: ...

    def kv_recv(self, commands: list[RecvCommand]) -> None:
        """Post one prefill step's receives on the ranks (a decode group)."""
        ...

    def kv_cancel(self, transfer_id: int) -> None:
        """No write of that transfer runs on the ranks after this (a decode group)."""
        ...

    def poll_events(self) -> list[TransferEvent]: ...

    def kv_scales(self) -> list[RankKVScales]:
        """Every rank's slice of its FP8 cache's scales, as reported at start-up (empty: unscaled)."""
        ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """One rank in this process; its KV agent's thread stops with `shutdown`."""

    def __init__(self, spec: RunnerSpec):
        self._spec = spec
        self._events: deque[TransferEvent] = deque()  # appended by the agent's thread
        self.runner = build_runner(spec, ParallelState.single(), self._events.append)
        self._results: deque[PendingSample | StepError] = deque()
        scales = rank_kv_scales(self.runner, spec)
        self._kv_scales = [scales] if scales is not None else []

    def kv_scales(self) -> list[RankKVScales]:
        return self._kv_scales

    def kv_connect(self, routes: list[KVRoute], namespaces: list[str]) -> None:
        handle_control(self.runner, KVConnect(routes, namespaces))

    def wait_kv_connected(self, timeout_s: float) -> None:
        pass  # `kv_connect` ran synchronously in this process

    def kv_recv(self, commands: list[RecvCommand]) -> None:
        handle_control(self.runner, KVRecv(commands))

    def kv_cancel(self, transfer_id: int) -> None:
        handle_control(self.runner, KVCancel(transfer_id))

    def poll_events(self) -> list[TransferEvent]:
        events = []
        while self._events:
            events.append(self._events.popleft())
        return events

    def submit(self, batch: StepBatch) -> None:
        try:
            self._results.append(self.runner.execute_async(batch))  # queued on the GPU, not waited for
        except Exception as err:
            if step_failure_is_fatal(err, batch, self._spec, 1, 1) is not None:
                raise
            self._results.append(StepError(batch.step_id, describe_error(err)))  # `collect` raises it

    def collect(self) -> SamplerOutput:
        """The oldest batch's tokens; `StepError` if computing it raised."""
        result = self._results.popleft()
        if isinstance(result, StepError):
            raise result
        return result.result()

    def ready(self) -> bool:
        # Only the device is left to wait for (no rank to lose): a driver may block on it.
        return bool(self._results)

    def has_events(self) -> bool:
        return bool(self._events)

    def wait_handles(self) -> list:
        return []  # nothing to block on: the agent's threads append events directly

    def shutdown(self) -> None:
        if self.runner.agent is not None:
            self.runner.agent.close()


def make_executor(spec: RunnerSpec, parallel: ParallelConfig, processes: bool = False, launcher=None) -> Executor:
    """In this process for one rank, unless ``processes`` asks for rank processes anyway or a
    launcher (Ray actors) is given."""
    if parallel.world_size == 1 and not processes and launcher is None:
        return LocalExecutor(spec)
    from splitserve.workers.worker_group import WorkerGroupExecutor

    return WorkerGroupExecutor(spec, parallel, launcher)
