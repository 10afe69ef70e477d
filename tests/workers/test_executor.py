"""workers/executor.py: `LocalExecutor` runs a tiny random model in this process (batches come
back in order; a step that raises is a `StepError` in its place unless it cannot be survived),
its typed KV commands reach the runner's agent (a transfer between two local executors over
the in-process transport; a cancelled one never writes), and the rules that decide whether a
step's exception ends its rank (`step_failure_is_fatal`) and how it is told (`describe_error`)."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from splitserve.kvtransfer.agent import KVAgentSpec
from splitserve.kvtransfer.messages import RecvCommand, SendCommand
from splitserve.kvtransfer.plan import make_routes
from splitserve.mapping import Mapping
from splitserve.workers.block_manager import BlockManager
from splitserve.workers.config import ModelConfig, SchedulerConfig
from splitserve.workers.executor import (
    RAISE_ON_TOKEN_ENV, InjectedStepFault, LocalExecutor, RunnerSpec, StepError, describe_error, handle_control,
    step_failure_is_fatal,
)
from splitserve.workers.model_source import random_config
from splitserve.workers.rank_messages import Stop
from splitserve.workers.sampler import SampleError
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.scheduler import Scheduler
from splitserve.workers.sequence import Sequence
from splitserve.workers.step_batch import build_step_batch

BS, NUM_BLOCKS = 4, 16
MODEL_CFG = ModelConfig.from_hf(random_config("tiny-llama"))
ROUTES = make_routes(Mapping(1, 0), Mapping(1, 0), MODEL_CFG.num_layers, MODEL_CFG.num_kv_heads)
GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
_namespaces = itertools.count()


def _spec(kv: KVAgentSpec | None = None) -> RunnerSpec:
    return RunnerSpec(MODEL_CFG, None, 0, NUM_BLOCKS, BS, torch.float32, "cpu", None, (2,), show_progress=False,
                      kv=kv)


def _prefill(prompt: list[int], step_id: int, sends: tuple[int, ...] = ()):
    """One step computing ``prompt`` (pushing its KV as ``sends`` transfers), and its sequence."""
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), BlockManager(NUM_BLOCKS, BS))
    seq = Sequence(f"r{step_id}", prompt, GREEDY)
    scheduler.add(seq)
    out = scheduler.schedule()
    commands = [SendCommand(t, list(seq.block_ids), ROUTES, 1) for t in sends]
    return build_step_batch(out, BS, commands, step_id=step_id), seq


PROMPTS = ([5, 17, 33, 8, 90, 41], [7, 7, 120, 3])


@pytest.fixture(scope="module")
def first_tokens() -> list[int]:
    """Each prompt's first token from an executor of its own."""
    tokens = []
    for prompt in PROMPTS:
        executor = LocalExecutor(_spec())
        executor.submit(_prefill(prompt, 1)[0])
        tokens.append(executor.collect().token_ids[0])
        executor.shutdown()
    return tokens


def test_batches_are_collected_in_the_order_they_were_submitted(first_tokens):
    executor = LocalExecutor(_spec())
    assert not executor.ready() and executor.wait_handles() == []
    for step_id, prompt in enumerate(PROMPTS, 1):
        executor.submit(_prefill(prompt, step_id)[0])
    assert executor.ready()
    assert [executor.collect().token_ids for _ in PROMPTS] == [[t] for t in first_tokens]
    assert not executor.ready()


@pytest.mark.parametrize("where", ["", ":sample"], ids=["forward", "sampling"])
def test_a_step_that_raises_is_a_step_error_in_its_place(where, first_tokens, monkeypatch):
    monkeypatch.setenv(RAISE_ON_TOKEN_ENV, f"99{where}")
    executor = LocalExecutor(_spec())
    executor.submit(_prefill([5, 99, 6], 1)[0])
    executor.submit(_prefill(PROMPTS[0], 2)[0])
    with pytest.raises(StepError, match="fault injection: token 99 in step 1") as err:
        executor.collect()
    assert err.value.step_id == 1
    assert executor.collect().token_ids == [first_tokens[0]]  # the rank went on


def test_a_step_that_raises_mid_forward_while_pushing_kv_is_not_survived(monkeypatch):
    monkeypatch.setenv(RAISE_ON_TOKEN_ENV, "99")
    executor = LocalExecutor(_spec(KVAgentSpec("prefill", "inprocess", f"exec{next(_namespaces)}/")))
    with pytest.raises(InjectedStepFault):
        executor.submit(_prefill([5, 99, 6], 1, sends=(1,))[0])
    executor.shutdown()


def _events(executor: LocalExecutor, n: int, timeout_s: float = 10.0) -> list:
    deadline, got = time.monotonic() + timeout_s, []
    while len(got) < n and time.monotonic() < deadline:
        got += executor.poll_events()
        time.sleep(0.005)
    return got


@pytest.fixture
def pair():
    """A prefill and a decode executor of one KV service, connected."""
    namespace = f"exec{next(_namespaces)}/"
    prefill = LocalExecutor(_spec(KVAgentSpec("prefill", "inprocess", namespace)))
    decode = LocalExecutor(_spec(KVAgentSpec("decode", "inprocess", namespace)))
    for executor in (prefill, decode):
        executor.kv_connect(ROUTES, [namespace])
        executor.wait_kv_connected(timeout_s=1)
    yield prefill, decode
    prefill.shutdown()
    decode.shutdown()


def test_kv_recv_receives_a_prefill_steps_blocks_where_asked(pair):
    prefill, decode = pair
    batch, seq = _prefill(PROMPTS[0], 1, sends=(1,))
    target = [9, 12]
    decode.kv_recv([RecvCommand(1, target, ROUTES, 1)])
    prefill.submit(batch)
    prefill.collect()
    [sent], [received] = _events(prefill, 1), _events(decode, 1)
    assert (sent.transfer_id, sent.ok, received.transfer_id, received.ok) == (1, True, 1, True)
    cache_p, cache_d = prefill.runner.kv_cache.data, decode.runner.kv_cache.data
    assert cache_p[:, :, seq.block_ids].any()
    assert torch.equal(cache_d[:, :, target], cache_p[:, :, seq.block_ids])


def test_kv_cancel_means_the_transfer_never_writes(pair):
    prefill, decode = pair
    batch, _ = _prefill(PROMPTS[1], 1, sends=(2,))
    decode.kv_cancel(2)
    decode.kv_recv([RecvCommand(2, [9], ROUTES, 1)])
    prefill.submit(batch)
    prefill.collect()
    assert [e.ok for e in _events(prefill, 1)] == [True]
    assert _events(decode, 1, timeout_s=0.3) == [] and not decode.has_events()
    assert not decode.runner.kv_cache.data.any()


def test_handle_control_refuses_what_is_not_a_control_message():
    with pytest.raises(TypeError, match="not a message a rank knows: Stop()"):
        handle_control(None, Stop())


# ---- which exceptions a rank survives --------------------------------------------------------


def _batch(kv_sends: bool = False):
    return _prefill([5, 6], 1, sends=(1,) if kv_sends else ())[0]


def _fatal(err: BaseException, world: int = 1, tp: int = 1, kv_sends: bool = False, async_scheduling: bool = False):
    spec = RunnerSpec(MODEL_CFG, None, 0, NUM_BLOCKS, BS, torch.float32, "cpu", None, (2,),
                      async_scheduling=async_scheduling)
    return step_failure_is_fatal(err, _batch(kv_sends), spec, world, tp)


def _caused_by(cause: BaseException) -> Exception:
    err = ValueError("wrapped")
    err.__cause__ = cause
    return err


@pytest.mark.parametrize(("err", "layout", "why"), [
    (ValueError("bad"), {}, None),  # one rank, no KV pushed: only the batch is lost
    (SampleError("nan"), {"world": 2, "tp": 2}, None),  # sampling comes after every collective
    (SampleError("nan"), {"kv_sends": True}, None),  # the forward, and its KV messages, are done
    (KeyboardInterrupt(), {}, "KeyboardInterrupt is not an Exception"),
    (RuntimeError("CUDA error: an illegal memory access"), {}, "the device reported an error"),
    (_caused_by(RuntimeError("NCCL watchdog timeout")), {}, "the device reported an error"),
    (ValueError("bad"), {"world": 2}, "a rank of 2 raised mid-step: its peers may wait in a collective"),
    (SampleError("nan"), {"world": 2, "tp": 2, "async_scheduling": True}, "a rank of 2 raised mid-step"),
    (ValueError("bad"), {"kv_sends": True}, "it raised while sending KV to a decode group"),
], ids=["survived", "sampling-tp", "sampling-kv", "not-exception", "cuda", "nccl-cause", "peers", "shared-samples",
        "kv-half-sent"])
def test_step_failure_is_fatal(err, layout, why):
    got = _fatal(err, **layout)
    assert got == why if why is None else got.startswith(why)


def test_describe_error_is_one_short_line():
    assert describe_error(ValueError("bad\n  value\there")) == "ValueError: bad value here"
    long = describe_error(RuntimeError("x" * 1000), limit=50)
    assert len(long) == 50 and long.startswith("RuntimeError: xxx") and long.endswith("...")
