"""The main loop of one rank process of a worker group.

Lifecycle: spawned by `WorkerGroupExecutor` -> set its thread share and ask the kernel to
kill it if the driver dies (no orphans) -> rendezvous with its peers (`ParallelState.init`)
-> build its runner (its shard of the weights, its share of the KV cache) -> send `Ready`
-> then for each `RunStep` from the driver run `execute_async`; the output rank replies
`StepResult`. KV control messages go to the runner's agent (`handle_control`). `Stop` or a
closed pipe ends the loop. The messages, and who sends which when: `rank_messages`.

A step that raises: the rank reports `StepFailed`. Where it can go on (`step_failure_is_fatal`
is None: a Python exception of a one-rank group, or of sampling) that reply takes the place of
the step's result, in order, and the rank serves the next step: only that batch is lost.
Otherwise its ``fatal`` says why, and the rank ends. Any exception that ends the rank is
reported as `RankError` (its traceback) before the process exits, so the driver fails the
group at once instead of waiting for a deadline.
"""

from __future__ import annotations

import ctypes
import signal
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from splitserve.mapping import Mapping
from splitserve.workers.config import ParallelConfig
from splitserve.workers.executor import (
    RunnerSpec, build_runner, describe_error, handle_control, peer_lost, rank_kv_scales, step_failure_is_fatal,
)
from splitserve.workers.parallel import ParallelState
from splitserve.workers.rank_messages import (
    DriverMessage, RankError, RankMessage, Ready, RunStep, StepFailed, StepResult, Stop, TransferReport,
)
from splitserve.workers.sampler import PendingSample
from splitserve.workers.step_batch import StepBatch


@dataclass(frozen=True)
class WorkerArgs:
    rank: int
    runner: RunnerSpec
    parallel: ParallelConfig
    host: str
    port: int
    backend: str
    num_threads: int

    @property
    def mapping(self) -> Mapping:
        return self.parallel.mapping(self.rank)


def _die_with_parent() -> None:
    # Linux only: SIGKILL this process when its parent goes, however the parent ends.
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def worker_main(args: WorkerArgs, raw_conn: Connection, die_with_parent: bool = True) -> None:
    """The rank's life; ``die_with_parent`` off where the process is not ours (a Ray actor)."""
    if die_with_parent:
        _die_with_parent()
    conn = LockedConnection(raw_conn)
    torch.set_num_threads(args.num_threads)
    try:
        parallel = ParallelState.init(args.mapping, args.host, args.port, args.backend, args.parallel.step_timeout_s,
                                      args.parallel.expert_parallel)
        runner = build_runner(args.runner, parallel, lambda event: conn.send(TransferReport(event)))
        conn.send(Ready(rank_kv_scales(runner, args.runner)))
        _serve(runner, conn, args)
    except (EOFError, BrokenPipeError):
        pass  # the driver is gone: nothing to report to
    except BaseException:
        _report(conn, traceback.format_exc())


#: How often a rank with a step on the device looks for the driver's next message.
_POLL_S = 0.0001


def _serve(runner, conn: "LockedConnection", args: WorkerArgs) -> None:
    """Steps are queued on the device as they come; a result goes back once its tokens are
    on the host, but a step the driver already sent (async scheduling sends step n+1 before
    it has step n's tokens) is queued first, so the device never waits for the pipe."""
    # (step id, its tokens on their way, or the reply of a step that raised), oldest first:
    # a failed step's reply waits its turn, as a result would.
    pending: deque[tuple[int, PendingSample | StepFailed]] = deque()
    while True:
        if pending and not _next_message_or_done(conn, pending[0][1]):
            step_id, out = pending.popleft()
            if isinstance(out, StepFailed):
                conn.send(out)
                continue
            try:
                result = out.result()
            except BaseException as err:  # the device failed after the step was queued: fatal
                _step_failed(conn, step_id, err, "it failed on the device")
                raise
            conn.send(StepResult(result))
            continue
        message: DriverMessage = conn.recv()
        match message:
            case Stop():
                return
            case RunStep(batch=batch):
                if (out := _run_step(runner, conn, batch, args)) is not None:
                    pending.append((batch.step_id, out))
            case _:  # a KV control message; `handle_control` refuses anything else
                if (reply := handle_control(runner, message)) is not None:
                    conn.send(reply)


def _run_step(runner, conn: "LockedConnection", batch: StepBatch,
              args: WorkerArgs) -> PendingSample | StepFailed | None:
    """Queue ``batch`` on the device: its tokens on their way (the output rank), its reply
    if it raised and this rank goes on (the output rank), or None (any other rank)."""
    try:
        return runner.execute_async(batch)
    except BaseException as err:
        if peer_lost(err):
            raise  # a peer rank died: this one ends too (a rank error), and no request is blamed
        world, tp = args.parallel.world_size, args.parallel.tensor_parallel_size
        fatal = step_failure_is_fatal(err, batch, args.runner, world, tp)
        if fatal is not None:
            _step_failed(conn, batch.step_id, err, fatal)
            raise
        traceback.print_exc()  # the whole story for the operator; the driver gets one line
        return StepFailed(batch.step_id, describe_error(err), None) if runner.is_output_rank else None


def _step_failed(conn: "LockedConnection", step_id: int, err: BaseException, fatal: str) -> None:
    """Tell the driver which step ended this rank, and why, before the process goes."""
    try:
        conn.send(StepFailed(step_id, describe_error(err), fatal))
    except (OSError, EOFError):
        pass


def _next_message_or_done(conn: "LockedConnection", oldest: PendingSample | StepFailed) -> bool:
    """Wait until the driver sent something (True) or the oldest step is done (False)."""
    if isinstance(oldest, StepFailed):
        return False  # its reply is ready
    while not oldest.done():
        if conn.poll(_POLL_S):
            return True
    return False


class LockedConnection:
    """The rank's pipe, shared by the main loop and the KV agent's thread: sends take a lock."""

    def __init__(self, conn: Connection):
        self._conn, self._lock = conn, threading.Lock()

    def send(self, message: RankMessage) -> None:
        with self._lock:
            self._conn.send(message)

    def recv(self) -> DriverMessage:
        return self._conn.recv()

    def poll(self, timeout_s: float) -> bool:
        return self._conn.poll(timeout_s)


def _report(conn: LockedConnection, message: str) -> None:
    try:
        conn.send(RankError(message))
    except (OSError, EOFError):
        pass
