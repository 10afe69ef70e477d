"""Executors: how the engine's `StepBatch` reaches the model, in this process or in a group.

- `LocalExecutor`: one rank, in the engine's own process (tp = pp = 1): no copies, no IPC.
- `WorkerGroupExecutor` (`worker_group.py`): tp x pp rank processes.

Both are built from one `RunnerSpec` (everything a rank needs to build its runner, picklable)
by `make_executor`; `build_runner` is the one place a rank's runner is assembled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from splitserve.workers.config import ModelConfig, ParallelConfig
from splitserve.workers.kv_cache import KVCacheSpec
from splitserve.workers.model_runner import ModelRunner
from splitserve.workers.parallel import ParallelState
from splitserve.workers.sampler import SamplerOutput
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
    #: "cpu" or "cuda": each rank of a group takes cuda:<local_rank>.
    device_type: str
    #: Index of the engine's CUDA device when it runs in-process.
    device_index: int | None
    eos_token_ids: tuple[int, ...]
    show_progress: bool = True


def rank_device(spec: RunnerSpec, parallel: ParallelState) -> torch.device:
    if spec.device_type == "cpu":
        return torch.device("cpu")
    if parallel.mapping.world_size == 1:
        return torch.device("cuda", spec.device_index or 0)
    return torch.device("cuda", parallel.mapping.local_rank)


def build_runner(spec: RunnerSpec, parallel: ParallelState) -> ModelRunner:
    device = rank_device(spec, parallel)
    kv = KVCacheSpec.for_rank(spec.model_cfg, parallel.mapping, spec.num_blocks, spec.block_size, spec.dtype)
    progress = spec.show_progress and parallel.mapping.rank == 0
    weights = None if spec.weights_dir is None else iter_safetensors(spec.weights_dir, progress)
    return ModelRunner.create(spec.model_cfg, parallel, kv, device, spec.eos_token_ids, weights, spec.seed)


class Executor(Protocol):
    """Batches are collected in the order they were submitted."""

    def submit(self, batch: StepBatch) -> None: ...

    def collect(self) -> SamplerOutput: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    def __init__(self, spec: RunnerSpec):
        self.runner = build_runner(spec, ParallelState.single())
        self._results: deque[SamplerOutput] = deque()

    def submit(self, batch: StepBatch) -> None:
        self._results.append(self.runner.execute(batch))

    def collect(self) -> SamplerOutput:
        return self._results.popleft()

    def shutdown(self) -> None:
        pass


def make_executor(spec: RunnerSpec, parallel: ParallelConfig) -> Executor:
    if parallel.world_size == 1:
        return LocalExecutor(spec)
    from splitserve.workers.worker_group import WorkerGroupExecutor

    return WorkerGroupExecutor(spec, parallel)
