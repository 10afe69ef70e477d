"""Executors: how the engine's `StepBatch` reaches the model, in this process or in a group.

- `LocalExecutor`: one rank, in the engine's own process (tp = pp = 1): no copies, no IPC.
- `WorkerGroupExecutor` (`worker_group.py`): tp x pp rank processes.

Both are built from one `RunnerSpec` (everything a rank needs to build its runner, picklable)
by `make_executor`; `build_runner` is the one place a rank's runner is assembled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from splitserve.kvtransfer.agent import KVAgentSpec, KVTransferAgent
from splitserve.kvtransfer.messages import TransferEvent
from splitserve.workers.config import ModelConfig, ParallelConfig
from splitserve.workers.kv_cache import KVCacheSpec
from splitserve.workers.model_runner import ModelRunner
from splitserve.workers.parallel import ParallelState
from splitserve.workers.sampler import PendingSample, SamplerOutput
from splitserve.workers.step_batch import StepBatch
from splitserve.workers.weights import iter_safetensors


class WorkerGroupError(RuntimeError):
    """A rank of the worker group died, hung past its deadline or raised."""


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
    kv = KVCacheSpec.for_rank(cfg, m, spec.num_blocks, spec.block_size, spec.dtype)
    progress = spec.show_progress and m.rank == 0
    weights = None if spec.weights_dir is None else iter_safetensors(spec.weights_dir, progress)
    runner = ModelRunner.create(cfg, parallel, kv, device, spec.eos_token_ids, weights, spec.seed,
                                share_samples=spec.async_scheduling)
    if spec.kv is not None:
        runner.agent = KVTransferAgent(spec.kv, m.rank, runner.kv_cache.data, m.pp_layers(cfg.num_layers).start,
                                       m.kv_heads(cfg.num_kv_heads).start, report)
    return runner


def handle_control(runner: ModelRunner, kind: str, payload: Any) -> str | None:
    """Apply a control message to a rank; returns the reply kind, if one is owed."""
    if kind == "kv_connect":  # (routes, the other side's group namespaces)
        runner.agent.connect(*payload)
        return "kv_connected"
    if kind == "kv_recv":
        runner.agent.post_recv(payload)
    elif kind == "kv_cancel":
        runner.agent.cancel(payload)
    else:
        raise ValueError(f"unknown control message {kind!r}")
    return None


class Executor(Protocol):
    """Batches are collected in the order they were submitted; control messages (KV
    transfer commands) reach every rank in order with the batches; rank events come back
    through `poll_events`."""

    def submit(self, batch: StepBatch) -> None: ...

    def collect(self) -> SamplerOutput: ...

    def ready(self) -> bool: ...

    def has_events(self) -> bool: ...

    def wait_handles(self) -> list: ...

    def control(self, kind: str, payload: Any) -> None: ...

    def wait_replies(self, kind: str, timeout_s: float) -> None: ...

    def poll_events(self) -> list[TransferEvent]: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """One rank in this process; its KV agent's thread stops with `shutdown`."""

    def __init__(self, spec: RunnerSpec):
        self._events: deque[TransferEvent] = deque()  # appended by the agent's thread
        self.runner = build_runner(spec, ParallelState.single(), self._events.append)
        self._results: deque[PendingSample] = deque()

    def control(self, kind: str, payload: Any) -> None:
        handle_control(self.runner, kind, payload)

    def wait_replies(self, kind: str, timeout_s: float) -> None:
        pass  # control messages run synchronously in this process

    def poll_events(self) -> list[TransferEvent]:
        events = []
        while self._events:
            events.append(self._events.popleft())
        return events

    def submit(self, batch: StepBatch) -> None:
        self._results.append(self.runner.execute_async(batch))  # queued on the GPU, not waited for

    def collect(self) -> SamplerOutput:
        return self._results.popleft().result()

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
