"""Worker groups of tp x pp rank processes: token-exact with one process and with
transformers in every layout, and a killed rank fails `generate()` fast, leaving no process.

Each group spawns real processes that rendezvous over gloo on loopback; the shared leak
check (conftest.py) runs after each test on the driver's block manager, the one owner of
block ids for every rank.

The driver's side of the conversation (`rank_messages`) is also checked against ranks the
test plays itself over pipes (`PipeLauncher`): no process, no model.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
from prompt_helpers import random_prompts

from splitserve import LLM, SamplingParams
from splitserve.kvtransfer.messages import RecvCommand, TransferEvent
from splitserve.kvtransfer.plan import make_routes
from splitserve.mapping import Mapping
from splitserve.workers.block_manager import BlockManager
from splitserve.workers.config import ModelConfig, ParallelConfig, SchedulerConfig
from splitserve.workers.executor import RunnerSpec, StepError, WorkerGroupError
from splitserve.workers.model_source import random_config
from splitserve.workers.rank_messages import (
    KVCancel, KVConnect, KVConnected, KVRecv, RankError, Ready, RunStep, StepFailed, StepResult, Stop,
    TransferReport,
)
from splitserve.workers.sampler import SamplerOutput
from splitserve.workers.scheduler import Scheduler
from splitserve.workers.sequence import Sequence
from splitserve.workers.step_batch import build_step_batch
from splitserve.workers.worker_group import WorkerGroupExecutor

GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


def _generate(model: str, tp: int, pp: int, prompts, **kw):
    with LLM(model, show_progress=False, tensor_parallel_size=tp, pipeline_parallel_size=pp,
             block_size=4, max_num_batched_tokens=48, **kw) as llm:
        return [o.token_ids for o in llm.generate(prompts, GREEDY)]


@pytest.mark.parametrize(("family", "tp", "pp"), [
    ("tiny-llama", 2, 1),
    ("tiny-llama", 4, 1),  # 2 KV heads on 4 ranks: each KV head replicated twice
    ("tiny-llama", 1, 2),
    ("tiny-llama", 1, 3),
    ("tiny-llama", 2, 2),
    ("tiny-qwen2", 2, 1),  # q/k/v bias split with the heads; tied embeddings, vocab-parallel head
    ("tiny-qwen3-moe", 2, 1),  # every expert's intermediate slice on each rank
    ("tiny-qwen3-moe", 1, 2),  # a sparse layer, then the dense one and a sparse one
])
def test_tiny_layouts_match_single_process_and_transformers(family, tp, pp, tiny_models):
    folder, oracle = tiny_models(family)
    prompts = random_prompts(oracle.model.config.vocab_size, [6, 30, 70, 2])
    single = _generate(str(folder), 1, 1, prompts)
    assert single == [oracle(p, GREEDY.max_tokens) for p in prompts]
    assert _generate(str(folder), tp, pp, prompts) == single


def test_expert_parallel_tp2_matches_transformers(tiny_models):
    # Each rank holds 4 whole experts of the 8; the tp all-reduce combines their outputs.
    folder, oracle = tiny_models("tiny-qwen3-moe")
    prompts = random_prompts(oracle.model.config.vocab_size, [6, 30, 70, 2])
    got = _generate(str(folder), 2, 1, prompts, expert_parallel=True)
    assert got == [oracle(p, GREEDY.max_tokens) for p in prompts]


@pytest.mark.parametrize(("tp", "pp"), [(3, 1), (1, 2)])
def test_smollm2_layouts_match_transformers(tp, pp, smollm2_dir, smollm2_tokenizer, smollm2_oracle):
    # 9 heads and 3 KV heads: tp 3 gives each rank 3 heads and 1 KV head.
    texts = ["The capital of France is", "def add(a, b):", "Rain is made of"]
    prompts = [smollm2_tokenizer.encode(t) for t in texts]
    got = _generate(str(smollm2_dir), tp, pp, prompts, max_model_len=512)
    assert got == [smollm2_oracle(p, GREEDY.max_tokens) for p in prompts]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); the executor reaps its children, so check the state
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_killed_rank_fails_generate_fast_and_leaves_no_process(tiny_models):
    folder, _ = tiny_models("tiny-llama")
    llm = LLM(str(folder), show_progress=False, tensor_parallel_size=2, pipeline_parallel_size=2)
    pids = llm.engine.executor_for_tests.pids
    killed_at = []

    def kill_rank_1():
        killed_at.append(time.monotonic())
        os.kill(pids[1], signal.SIGKILL)

    timer = threading.Timer(1.0, kill_rank_1)
    timer.start()
    long = SamplingParams(max_tokens=100_000 // 100, temperature=0.0, ignore_eos=True)
    with pytest.raises(WorkerGroupError, match=r"rank 1 .*died|rank 1 closed|rank \d raised"):
        llm.generate([[5] * 20] * 4, long)
    assert time.monotonic() - killed_at[0] < 30
    timer.join()
    assert not any(_alive(p) for p in pids)
    with pytest.raises(RuntimeError, match="failed"):
        llm.generate([[1, 2]], GREEDY)  # the engine says so instead of hanging


def test_pipeline_keeps_micro_batches_in_flight(tiny_models):
    folder, oracle = tiny_models("tiny-llama")
    prompts = random_prompts(oracle.model.config.vocab_size, [6, 30, 12, 9], seed=3)
    with LLM(str(folder), show_progress=False, pipeline_parallel_size=2, block_size=4) as llm:
        engine, depth, done = llm.engine, [], {}
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, GREEDY)
        while engine.has_unfinished_requests():
            for out in engine.step():
                done[out.request_id] = out.token_ids
            depth.append(len(engine._inflight))
    assert max(depth) == 1  # after collecting one of two: the other is still in flight
    assert sum(d == 1 for d in depth) > len(depth) // 2
    assert [done[str(i)] for i in range(4)] == [oracle(p, GREEDY.max_tokens) for p in prompts]


# ---- the driver's side of the conversation, against ranks played by the test ---------------


class PipeLauncher:
    """Ranks played by the test: the driver gets one end of a pipe per rank, the test the
    other (``ranks``). Each rank first sends what ``hello`` gives for its rank number."""

    def __init__(self, hello=lambda rank: Ready()):
        self.hello, self.procs, self.ranks = hello, [], []

    def rendezvous(self, world: int) -> tuple[str, int]:
        return "127.0.0.1", 0

    def num_threads(self, spec, world: int) -> int:
        return 1

    def start(self, args) -> list:
        drivers = []
        for a in args:
            driver, rank = mp.Pipe()
            rank.send(self.hello(a.rank))
            drivers.append(driver)
            self.ranks.append(rank)
        return drivers

    def sentinels(self) -> dict[int, int]:
        return {}

    def dead(self) -> list[str]:
        return []

    def describe(self, rank: int) -> str:
        return f"rank {rank}"

    def stopper(self):
        return lambda: None


def _group(tp: int = 1, pp: int = 2, launcher: PipeLauncher | None = None) -> tuple[WorkerGroupExecutor, list]:
    """A driver over test-played ranks (pp 2: rank 1 is the output rank)."""
    spec = RunnerSpec(ModelConfig.from_hf(random_config("tiny-llama")), None, 0, 8, 4, None, "cpu", None, (2,))
    launcher = launcher or PipeLauncher()
    parallel = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, step_timeout_s=5,
                              startup_timeout_s=5)
    return WorkerGroupExecutor(spec, parallel, launcher), launcher.ranks


def _batch(step_id: int):
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), BlockManager(32, 4))
    scheduler.add(Sequence("r", [3, 4, 5], SamplingParams(max_tokens=2, temperature=0.0)))
    return build_step_batch(scheduler.schedule(), 4, [], step_id=step_id)


def _tokens(*ids: int) -> SamplerOutput:
    return SamplerOutput(list(ids), [None] * len(ids))


def test_driver_sends_steps_to_every_rank_and_collects_the_output_ranks_results():
    group, ranks = _group()
    batch = _batch(1)
    group.submit(batch)
    assert [r.recv() for r in ranks] == [RunStep(batch), RunStep(batch)]
    event = TransferEvent(9, "send", 1, True)
    ranks[1].send(TransferReport(event))
    assert not group.ready() and group.has_events()
    ranks[1].send(StepResult(_tokens(42)))
    assert group.ready() and group.collect() == _tokens(42)
    assert group.poll_events() == [event] and not group.has_events()
    group.shutdown()
    assert [r.recv() for r in ranks] == [Stop(), Stop()]


def test_a_step_the_output_rank_survived_is_a_step_error_in_its_place_and_the_group_goes_on():
    group, ranks = _group()
    group.submit(_batch(1))
    group.submit(_batch(2))
    ranks[1].send(StepFailed(1, "ValueError: boom", None))
    ranks[1].send(StepResult(_tokens(7)))
    with pytest.raises(StepError, match="boom") as err:
        group.collect()
    assert err.value.step_id == 1 and group.collect() == _tokens(7) and group.failed is None
    group.shutdown()


@pytest.mark.parametrize(("rank", "message", "why"), [
    (1, StepFailed(3, "RuntimeError: CUDA error", "the device reported an error"), "the device reported an error"),
    (0, StepFailed(3, "ValueError: boom", None), "not the output rank"),
])
def test_a_step_that_ended_a_rank_fails_the_group_and_names_the_step(rank, message, why):
    group, ranks = _group()
    group.submit(_batch(3))
    ranks[rank].send(message)
    with pytest.raises(WorkerGroupError, match=f"rank {rank} raised in step 3 and ends \\({why}\\)") as err:
        group.collect()
    assert err.value.step_failure.step_id == 3 and group.step_failure.message == message.message


def test_a_rank_error_fails_the_group_with_its_traceback():
    group, ranks = _group()
    ranks[0].send(RankError("Traceback: something broke"))
    with pytest.raises(WorkerGroupError, match="rank 0 raised:\nTraceback: something broke"):
        group.poll_events()
    with pytest.raises(WorkerGroupError, match="already failed"):
        group.submit(_batch(1))


def test_a_rank_error_at_start_fails_the_group():
    launcher = PipeLauncher(lambda rank: RankError("no weights") if rank == 1 else Ready())
    with pytest.raises(WorkerGroupError, match="rank 1 raised:\nno weights"):
        _group(launcher=launcher)


def test_a_message_out_of_turn_fails_the_group():
    group, ranks = _group()
    ranks[1].send(Ready())
    with pytest.raises(WorkerGroupError, match="rank 1 sent Ready\\(\\) out of turn"):
        group.poll_events()


def test_kv_commands_reach_every_rank_in_order_with_the_steps():
    group, ranks = _group(tp=2, pp=1)
    routes = make_routes(Mapping(1, 0), Mapping(2, 0, tp_size=2), 2, 2)
    recvs = [RecvCommand(5, [1], routes, 1)]
    batch = _batch(1)
    group.kv_connect(routes, ["prefill-0/"])
    for r in ranks:
        r.send(KVConnected())
    group.wait_kv_connected(timeout_s=5)
    group.kv_recv(recvs)
    group.submit(batch)
    group.kv_cancel(5)
    for r in ranks:
        assert [r.recv() for _ in range(4)] == [KVConnect(routes, ["prefill-0/"]), KVRecv(recvs), RunStep(batch),
                                                KVCancel(5)]
    group.shutdown()


def test_waiting_for_kv_connected_fails_the_group_at_its_deadline():
    group, ranks = _group(tp=2, pp=1)
    group.kv_connect([], ["decode-0/"])
    ranks[0].send(KVConnected())  # rank 1 never answers
    with pytest.raises(WorkerGroupError, match="kv_connect timed out"):
        group.wait_kv_connected(timeout_s=0.2)
