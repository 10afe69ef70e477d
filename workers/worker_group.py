"""A worker group as tp x pp rank processes, driven from the engine's process.

Lifecycle:
    start    a launcher starts one process per rank and gives each its connection: here
             spawned processes with pipes (`ProcessLauncher`), or Ray actors in a placement
             group connected back over TCP (`splitserve.cluster.ray_group.RayLauncher`);
             they rendezvous on a TCPStore and load their shards; wait for every `Ready`
             within ``startup_timeout_s``.
    submit   send a micro-batch (`StepBatch`) to every rank; up to pp are in flight.
    collect  wait for the output rank's result of the oldest one within ``step_timeout_s``
             while watching every rank's process: a rank that dies, raises or hangs fails
             the step at once with `WorkerGroupError`. A step that raised where its rank goes
             on (worker.py) is `StepError` instead, in its result's place: the group goes on.
    shutdown ask ranks to stop, then terminate and kill what is left; also run by a
             finalizer, and ranks die with their parent (PR_SET_PDEATHSIG): no orphans.
After a failure the group is shut down and unusable; the engine fails its requests.
The messages each way, and when each is sent: `rank_messages`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import weakref
from collections import deque
from multiprocessing.connection import Connection, wait

from splitserve.kvtransfer.messages import KVRoute, RankKVScales, RecvCommand, TransferEvent
from splitserve.workers.config import ParallelConfig
from splitserve.workers.executor import RunnerSpec, StepError, WorkerGroupError
from splitserve.workers.rank_messages import (
    DriverMessage, KVCancel, KVConnect, KVConnected, KVRecv, RankError, RankMessage, Ready, RunStep, StepFailed,
    StepResult, Stop, TransferReport,
)
from splitserve.workers.sampler import SamplerOutput
from splitserve.workers.step_batch import StepBatch
from splitserve.workers.worker import WorkerArgs, worker_main

_STOP_GRACE_S = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _terminate(procs: list[mp.Process]) -> None:
    deadline = time.monotonic() + _STOP_GRACE_S
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=1.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=1.0)


class ProcessLauncher:
    """Ranks as spawned processes of this machine, one pipe each (spawn: safe with CUDA)."""

    def __init__(self):
        self.procs: list[mp.Process] = []

    def rendezvous(self, world: int) -> tuple[str, int]:
        return "127.0.0.1", _free_port()

    def num_threads(self, spec: RunnerSpec, world: int) -> int:
        # Several ranks on a few cores: each gets its share, or they fight over every core.
        return max(1, (os.cpu_count() or 1) // world) if spec.device_type == "cpu" else 1

    def start(self, args: list[WorkerArgs]) -> list[Connection]:
        ctx, conns = mp.get_context("spawn"), []
        for a in args:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(a, child), name=f"splitserve-rank{a.rank}", daemon=True)
            proc.start()
            child.close()
            conns.append(parent)
            self.procs.append(proc)
        return conns

    def sentinels(self) -> dict[int, int]:
        """Waitable handles that fire when a rank's process ends, by rank."""
        return {p.sentinel: rank for rank, p in enumerate(self.procs)}

    def dead(self) -> list[str]:
        return [self.describe(rank) for rank, p in enumerate(self.procs) if not p.is_alive()]

    def describe(self, rank: int) -> str:
        p = self.procs[rank]
        return f"rank {rank} (pid {p.pid}) died with exit code {p.exitcode}"

    def stopper(self):
        """What stops the ranks (run by the executor's finalizer: holds no executor)."""
        return lambda procs=self.procs: _terminate(procs)


class WorkerGroupExecutor:
    """Drives the ranks a launcher starts (local processes, or Ray actors: `RayLauncher`)."""

    def __init__(self, spec: RunnerSpec, parallel: ParallelConfig, launcher=None):
        self.parallel = parallel
        self.launcher = launcher or ProcessLauncher()
        world = parallel.world_size
        backend = "nccl" if spec.device_type == "cuda" else "gloo"
        self._finalizer = weakref.finalize(self, self.launcher.stopper())
        host, port = self.launcher.rendezvous(world)
        threads = self.launcher.num_threads(spec, world)
        args = [WorkerArgs(rank, spec, parallel, host, port, backend, threads) for rank in range(world)]
        self.conns: list[Connection] = self.launcher.start(args)
        self.output_rank = (parallel.pipeline_parallel_size - 1) * parallel.tensor_parallel_size
        self.failed: str | None = None
        self._events: list[TransferEvent] = []  # KV transfer reports, kept until polled
        # Sampled tokens (or the `StepError` of a step that raised), oldest batch first.
        self._results: deque[SamplerOutput | StepError] = deque()
        #: The step whose exception ended a rank, once one has (`WorkerGroupError.step_failure`).
        self.step_failure: StepError | None = None
        self._submitted: deque[float] = deque()  # when each outstanding batch was sent
        self._kv_connected: list[int] = []  # ranks whose `KVConnected` is not yet waited for
        self._kv_scales: list[RankKVScales] = []  # each rank's FP8 scales, from its `Ready`
        self._await_ready(time.monotonic() + parallel.startup_timeout_s)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.launcher.procs]

    def _await_ready(self, deadline: float) -> None:
        pending = set(range(len(self.conns)))
        while pending:
            match self._next_message(deadline, "start"):
                case rank, Ready(kv_scales=scales):
                    pending.discard(rank)
                    if scales is not None:
                        self._kv_scales.append(scales)

    def kv_scales(self) -> list[RankKVScales]:
        """Every rank's slice of its FP8 cache's scales, from its `Ready` (empty: unscaled)."""
        return list(self._kv_scales)

    def submit(self, batch: StepBatch) -> None:
        """Send a micro-batch to every rank; ranks work through batches in order, so with
        pipeline stages the next batch enters stage 0 while the previous one is in stage 1."""
        self._send_all(RunStep(batch))
        self._submitted.append(time.monotonic())

    def ready(self) -> bool:
        """The oldest outstanding batch's result is here (`collect` will not wait). Reads
        what the ranks sent without waiting; a dead rank, or a batch past the step deadline,
        fails the group here too."""
        self._drain()
        if not self._results and self._submitted and \
                time.monotonic() - self._submitted[0] > self.parallel.step_timeout_s:
            self._fail(f"step timed out after its deadline ({self.parallel.step_timeout_s:.0f} s)")
        return bool(self._results)

    def has_events(self) -> bool:
        """Transfer reports read off the pipes and not yet polled."""
        return bool(self._events)

    def wait_handles(self) -> list:
        """What `multiprocessing.connection.wait` can block on until a rank sends something."""
        return list(self.conns) + list(self.launcher.sentinels())

    def collect(self) -> SamplerOutput:
        """The oldest outstanding batch's sampled tokens, within the step deadline; `StepError`
        if computing it raised and the ranks went on (the group is fine)."""
        deadline = time.monotonic() + self.parallel.step_timeout_s
        while not self._results:
            self._stash(*self._next_message(deadline, "step"))
        if self._submitted:
            self._submitted.popleft()
        result = self._results.popleft()
        if isinstance(result, StepError):
            raise result
        return result

    # KV transfer commands reach every rank in order with the batches (`Executor`).

    def kv_connect(self, routes: list[KVRoute], namespaces: list[str]) -> None:
        self._send_all(KVConnect(routes, namespaces))

    def wait_kv_connected(self, timeout_s: float) -> None:
        """Wait until every rank has answered `kv_connect`."""
        deadline = time.monotonic() + timeout_s
        while len(self._kv_connected) < len(self.conns):
            self._stash(*self._next_message(deadline, "kv_connect"))
        self._kv_connected = []

    def kv_recv(self, commands: list[RecvCommand]) -> None:
        self._send_all(KVRecv(commands))

    def kv_cancel(self, transfer_id: int) -> None:
        self._send_all(KVCancel(transfer_id))

    def poll_events(self) -> list[TransferEvent]:
        """Transfer events reported so far, without waiting (a dead rank still fails here)."""
        self._drain()
        events, self._events = self._events, []
        return events

    def _drain(self) -> None:
        """File every message already sent, without waiting; a dead rank fails the group."""
        for rank, conn in enumerate(self.conns):
            while not self.failed and conn.poll(0):
                self._stash(*self._receive(rank, conn))
        if self.failed:
            raise WorkerGroupError(f"worker group already failed: {self.failed}")
        for reason in self.launcher.dead():
            self._fail(reason)

    def _stash(self, rank: int, message: RankMessage) -> None:
        # Whatever reads the pipes (collect, poll_events, wait_kv_connected) files each message here.
        match message:
            case TransferReport(event=event):
                self._events.append(event)
            case StepResult(output=output):
                if rank == self.output_rank:
                    self._results.append(output)
            case StepFailed(step_id=step_id, message=text):  # one the rank survived (`_receive` fails the others)
                self._results.append(StepError(step_id, text))
            case KVConnected():
                self._kv_connected.append(rank)
            case _:
                self._fail(f"rank {rank} sent {message!r} out of turn")

    def _send_all(self, message: DriverMessage) -> None:
        if self.failed:
            raise WorkerGroupError(f"worker group already failed: {self.failed}")
        for rank, conn in enumerate(self.conns):
            try:
                conn.send(message)
            except OSError:
                self._drain()  # what the ranks sent before going first: which step ended one, if any
                self._fail(f"rank {rank} is gone (pipe closed)")

    def _next_message(self, deadline: float, phase: str) -> tuple[int, RankMessage]:
        """The next message from any rank; a dead rank, an error or the deadline fails the group."""
        sentinels = self.launcher.sentinels()
        conns = {c: rank for rank, c in enumerate(self.conns)}
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"{phase} timed out after its deadline ({self.parallel.step_timeout_s if phase == 'step' else self.parallel.startup_timeout_s:.0f} s)")
            ready = wait(list(conns) + list(sentinels), timeout=remaining)
            for obj in ready:  # messages first: a rank reports its error, then exits
                if obj in conns:
                    return self._receive(conns[obj], obj)
            for obj in ready:
                self._fail(f"{self.launcher.describe(sentinels[obj])} during {phase}")

    def _receive(self, rank: int, conn: Connection) -> tuple[int, RankMessage]:
        """The rank's next message; one saying that the rank ends fails the group here."""
        try:
            message = conn.recv()
        except (EOFError, OSError):
            self._fail(f"rank {rank} closed its pipe (process died)")
        match message:
            case RankError(traceback=tb):
                self._fail(f"rank {rank} raised:\n{tb}")
            # Only the output rank's replies take a step's place; any other rank's ends it.
            case StepFailed(fatal=fatal) as failed if fatal is not None or rank != self.output_rank:
                self.step_failure = StepError(failed.step_id, failed.message)
                self._fail(f"rank {rank} raised in step {failed.step_id} and ends "
                           f"({fatal or 'not the output rank'}): {failed.message}")
        return rank, message

    def _fail(self, reason: str):
        self.failed = reason
        self.shutdown()
        raise WorkerGroupError(f"worker group (tp={self.parallel.tensor_parallel_size}, "
                               f"pp={self.parallel.pipeline_parallel_size}) failed: {reason}",
                               self.step_failure)

    def shutdown(self) -> None:
        for conn in self.conns:
            try:
                conn.send(Stop())
            except OSError:
                pass
        self._finalizer()
        for conn in self.conns:
            conn.close()
