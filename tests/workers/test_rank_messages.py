"""workers/rank_messages.py and the rank's side of the conversation (worker.py's loop): every
message survives the pipe (pickle) unchanged, and the rank answers each driver message as the
module docstring says, in order, and refuses what is not a message. The loop runs here on a
fake connection and a fake runner: no process, no model."""

from __future__ import annotations

import pickle
from collections import deque

import pytest

from splitserve.kvtransfer.messages import RecvCommand, TransferEvent
from splitserve.kvtransfer.plan import make_routes
from splitserve.mapping import Mapping
from splitserve.workers.block_manager import BlockManager
from splitserve.workers.config import ModelConfig, ParallelConfig, SchedulerConfig
from splitserve.workers.executor import RunnerSpec, peer_lost
from splitserve.workers.model_source import random_config
from splitserve.workers.rank_messages import (
    KVCancel, KVConnect, KVConnected, KVRecv, RankError, Ready, RunStep, StepFailed, StepResult, Stop,
    TransferReport,
)
from splitserve.workers.sampler import SampleError, SamplerOutput
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.scheduler import Scheduler
from splitserve.workers.sequence import Sequence
from splitserve.workers.step_batch import build_step_batch
from splitserve.workers.worker import WorkerArgs, _serve

ROUTES = make_routes(Mapping(1, 0), Mapping(1, 0), 2, 2)


def _batch(step_id: int, prompt: list[int] | None = None):
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), BlockManager(32, 4))
    scheduler.add(Sequence("r", prompt or [3, 4, 5, 6], SamplingParams(max_tokens=2, temperature=0.0)))
    return build_step_batch(scheduler.schedule(), 4, [], step_id=step_id)


@pytest.mark.parametrize("message", [
    RunStep(_batch(7)), Stop(), KVConnect(ROUTES, ["ns-a", "ns-b"]),
    KVRecv([RecvCommand(3, [1, 2], ROUTES, 1, "ns-a")]), KVCancel(3),
    Ready(), StepResult(SamplerOutput([11, 12], [None, None])), StepFailed(7, "ValueError: boom", None),
    StepFailed(7, "RuntimeError: CUDA error", "the device reported an error"),
    TransferReport(TransferEvent(3, "recv", 0, True, num_bytes=64)), KVConnected(), RankError("Traceback ..."),
], ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_pickle(message):
    back = pickle.loads(pickle.dumps(message))
    assert type(back) is type(message) and back == message


def test_messages_are_frozen():
    with pytest.raises(AttributeError):
        KVCancel(3).transfer_id = 4


# ---- the rank's loop -----------------------------------------------------------------------


class FakeConn:
    """The driver's end as the loop sees it: what the driver sent, and what the rank sends."""

    def __init__(self, *inbox):
        self.inbox, self.sent = deque(inbox), []

    def recv(self):
        return self.inbox.popleft()

    def poll(self, timeout_s: float) -> bool:
        return bool(self.inbox)

    def send(self, message) -> None:
        self.sent.append(message)


class Done:
    """A step's tokens, already on the host."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens

    def done(self) -> bool:
        return True

    def result(self) -> SamplerOutput:
        return SamplerOutput(self.tokens, [None] * len(self.tokens))


class FakeAgent:
    def __init__(self):
        self.calls = []

    def connect(self, routes, namespaces):
        self.calls.append(("connect", routes, namespaces))

    def post_recv(self, commands):
        self.calls.append(("post_recv", commands))

    def cancel(self, transfer_id):
        self.calls.append(("cancel", transfer_id))


class FakeRunner:
    """Step n samples token n; a step whose prompt holds 99 raises ``raises``."""

    def __init__(self, raises: type[Exception] = ValueError, output_rank: bool = True):
        self.agent, self.raises, self.is_output_rank = FakeAgent(), raises, output_rank

    def execute_async(self, batch):
        if 99 in batch.input_ids:
            raise self.raises("boom")
        return Done([batch.step_id]) if self.is_output_rank else None


def _args(tp: int = 1) -> WorkerArgs:
    spec = RunnerSpec(ModelConfig.from_hf(random_config("tiny-llama")), None, 0, 8, 4, None, "cpu", None, (2,))
    return WorkerArgs(0, spec, ParallelConfig(tensor_parallel_size=tp), "127.0.0.1", 0, "gloo", 1)


def test_steps_are_answered_in_order_and_stop_ends_the_loop():
    conn = FakeConn(RunStep(_batch(1)), RunStep(_batch(2)), Stop(), RunStep(_batch(3)))
    _serve(FakeRunner(), conn, _args())
    assert conn.sent == [StepResult(SamplerOutput([1], [None])), StepResult(SamplerOutput([2], [None]))]
    assert len(conn.inbox) == 1  # nothing after Stop is read


def test_a_step_the_rank_survives_is_answered_in_its_place_and_the_rank_goes_on():
    conn = FakeConn(RunStep(_batch(1)), RunStep(_batch(2, [3, 99])), RunStep(_batch(3)), Stop())
    _serve(FakeRunner(), conn, _args())
    assert conn.sent == [StepResult(SamplerOutput([1], [None])), StepFailed(2, "ValueError: boom", None),
                         StepResult(SamplerOutput([3], [None]))]


def test_only_the_output_rank_answers_steps():
    conn = FakeConn(RunStep(_batch(1)), RunStep(_batch(2, [3, 99])), Stop())
    _serve(FakeRunner(raises=SampleError, output_rank=False), conn, _args(tp=2))
    assert conn.sent == []


def test_a_step_that_ends_the_rank_is_named_before_the_exception_leaves():
    conn = FakeConn(RunStep(_batch(4, [3, 99])), Stop())
    with pytest.raises(ValueError, match="boom"):
        _serve(FakeRunner(), conn, _args(tp=2))  # a rank of 2 raised mid-forward: its peers may hang
    [failed] = conn.sent
    assert (failed.step_id, failed.message) == (4, "ValueError: boom") and "rank of 2" in failed.fatal


GLOO_PEER_GONE = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:32392: "
                  "Connection reset by peer")


class PeerGone(RuntimeError):
    def __init__(self, message: str):
        super().__init__(GLOO_PEER_GONE)


@pytest.mark.parametrize("tp", [1, 2])
def test_a_step_that_fails_because_a_peer_died_ends_the_rank_and_blames_no_request(tp):
    """A killed peer makes this rank's collective raise: not the batch's doing. No StepFailed
    goes out (its verdict would fail or isolate innocent requests); the rank ends, and
    `worker_main` reports the exception as the rank's error."""
    conn = FakeConn(RunStep(_batch(1)), RunStep(_batch(2, [3, 99])), Stop())
    with pytest.raises(PeerGone):
        _serve(FakeRunner(raises=PeerGone), conn, _args(tp=tp))
    assert conn.sent == [StepResult(SamplerOutput([1], [None]))]


def test_peer_lost_tells_a_peer_s_death_from_the_batch_s_own_error():
    from torch.distributed import DistNetworkError

    assert peer_lost(RuntimeError(GLOO_PEER_GONE)) and peer_lost(DistNetworkError("store gone"))
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = RuntimeError("Connection closed by peer")
    assert peer_lost(wrapped)
    assert not peer_lost(ValueError("token id 99 out of range")) and not peer_lost(RuntimeError("CUDA error: x"))


def test_kv_control_reaches_the_agent_in_order_and_only_connect_is_answered():
    recvs = [RecvCommand(5, [1], ROUTES, 1)]
    conn = FakeConn(KVConnect(ROUTES, ["ns"]), KVRecv(recvs), RunStep(_batch(1)), KVCancel(5), Stop())
    runner = FakeRunner()
    _serve(runner, conn, _args())
    assert runner.agent.calls == [("connect", ROUTES, ["ns"]), ("post_recv", recvs), ("cancel", 5)]
    assert conn.sent == [KVConnected(), StepResult(SamplerOutput([1], [None]))]


@pytest.mark.parametrize("stranger", [("step", None), Ready(), "stop"], ids=["old-tuple", "rank-message", "str"])
def test_anything_else_is_refused_with_a_clear_error(stranger):
    conn = FakeConn(stranger)
    with pytest.raises(TypeError, match="not a message a rank knows"):
        _serve(FakeRunner(), conn, _args())
    assert conn.sent == []
