"""Groups of both roles lost while streams run (issue 14): 2 prefill + 2 decode groups of rank
processes, a prefill group's rank and a decode group's rank killed mid-stream, one after the
other or at once. Every stream completes token-exact with transformers (the tokens a client
would see, chunk by chunk, and the final output), requests that arrive while groups are down
go to the healthy ones, the lost groups rejoin and serve again, and the shared leak check
(conftest.py) finds no block left on any group, old or new. Also: a group whose failure no
step has seen yet is skipped when a request is placed on it, and a decode group lost right
after admitting a request does not cost its client the first token.

The tests share one engine (each leaves every group up again) and drive it as the router's
engine thread does (`EngineLoop`): add, step, rebuild failed groups with the engine factory
and `attach_group` (on this thread: a rank process is killed when the thread that started
it ends).
"""

from __future__ import annotations

import itertools
import os
import signal
import time

import pytest
from launch_helpers import build_group
from prompt_helpers import random_prompts

from splitserve import SamplingParams
from splitserve.workers.config import CacheConfig, SchedulerConfig
from splitserve.workers.disagg_engine import DisaggConfig, DisaggEngine, GroupLoad
from splitserve.workers.engine import EngineConfig

MAX_TOKENS = 40
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
STEP_DEADLINE_S = 30.0


class Alternate:
    """Healthy groups in turn, so both groups of a role have requests when one is killed."""

    def __init__(self):
        self._turns: dict[str, itertools.count] = {}

    def rank(self, role: str, loads: list[GroupLoad], prompt_ids: list[int]) -> list[str]:
        healthy = [g.name for g in loads if g.healthy]
        start = next(self._turns.setdefault(role, itertools.count())) % max(1, len(healthy))
        return healthy[start:] + healthy[:start]


class Driver:
    """Adds requests, steps, collects what each stream's client gets, rebuilds lost groups."""

    def __init__(self, engine: DisaggEngine, oracle, seed: int):
        self.engine, self.oracle = engine, oracle
        # Long enough that each group's prompts take several steps (16 tokens a step); new
        # ones for each test, so no group has them in its prefix cache already.
        self.prompts = random_prompts(oracle.model.config.vocab_size, [37, 45, 52, 29, 44, 33], seed=seed)
        self.prompt_of: dict[str, list[int]] = {}
        self.streamed: dict[str, list[int]] = {}
        self.final: dict[str, object] = {}
        self._ids = itertools.count()

    def add(self, n: int) -> None:
        for _ in range(n):
            i = next(self._ids)
            rid, prompt = f"r{i}", self.prompts[i % len(self.prompts)]
            self.engine.add_request(rid, prompt, PARAMS, stream=True)
            self.prompt_of[rid], self.streamed[rid] = prompt, []

    def step(self) -> None:
        for out in self.engine.step():
            self.streamed[out.request_id] += out.new_token_ids
            if out.finished:
                self.final[out.request_id] = out

    def step_until(self, what: str, cond) -> None:
        deadline = time.monotonic() + STEP_DEADLINE_S
        while not cond():
            assert time.monotonic() < deadline, f"never {what}"
            self.step()

    def busy(self, name: str) -> bool:
        load = self.engine.group(name).load()
        return load.num_running + load.num_waiting > 0

    def kill(self, *names: str) -> None:
        """SIGKILL each group's rank and wait until it is gone (several: all dead before the
        driver looks again, so no order of noticing is favoured)."""
        procs = [self.engine.group(name).engine.executor_for_tests.launcher.procs[0] for name in names]
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)
        for proc in procs:
            proc.join(10)

    def failed(self, name: str) -> bool:
        return self.engine.group(name).error is not None

    def rebuild_failed(self) -> list[str]:
        names = [g.name for g in self.engine.failed_groups()]
        for name in names:
            fresh = self.engine.new_group_config(name)
            self.engine.attach_group(fresh, build_group(fresh))
        return names

    def finish(self) -> None:
        self.step_until("finished every request", lambda: not self.engine.has_unfinished_requests())

    def check_streams(self) -> None:
        """Every request finished without error, token-exact, and its client's chunks add up."""
        for rid, prompt in self.prompt_of.items():
            out = self.final[rid]
            assert out.error is None, (rid, out.error)
            assert out.token_ids == self.oracle(prompt, MAX_TOKENS), rid
            assert self.streamed[rid] == out.token_ids, rid


_SEEDS = itertools.count(5)


@pytest.fixture(scope="module")
def engine(tiny_models):
    """One engine for the module (starting 4 groups costs seconds): each test leaves every
    group healthy again, rebuilt where it killed one."""
    # Small steps spread a prompt's prefill over several steps: a kill finds prompts there
    # as well as requests decoding.
    folder, _ = tiny_models("tiny-llama")
    base = EngineConfig(model=str(folder), show_progress=False, cache=CacheConfig(block_size=4, num_blocks=256),
                        scheduler=SchedulerConfig(max_num_batched_tokens=16))
    config = DisaggConfig(prefill=base, decode=base, num_prefill=2, num_decode=2, transfer_timeout_s=20.0)
    engine = DisaggEngine(config, policy=Alternate(), engine_factory=build_group)
    yield engine
    engine.shutdown()


@pytest.fixture
def driver(engine, tiny_models):
    engine.policy = Alternate()  # every test places its requests alike
    d = Driver(engine, tiny_models("tiny-llama")[1], next(_SEEDS))
    yield d
    for rid in d.prompt_of:  # a failed test's leftovers (the leak check then reports only the failure)
        engine.abort_request(rid)
    d.finish()
    d.rebuild_failed()  # the next test starts with every group up


@pytest.mark.parametrize(("prefill", "decode", "together"), [
    ("prefill-0", "decode-1", False),
    ("prefill-1", "decode-0", True),
], ids=["one-after-the-other", "both-at-once"])
def test_prefill_and_decode_groups_lost_mid_stream_streams_complete_token_exact(engine, driver, prefill, decode,
                                                                                together):
    d = driver
    resent, restarts = engine.num_resent, {g.name: g.restarts for g in engine.groups}

    def decoding() -> bool:
        return engine.group(decode).load().num_running > 0

    d.add(8)
    d.step_until(f"had prompts on {prefill} and requests decoding on {decode}", lambda: d.busy(prefill) and decoding())
    if together:
        d.kill(prefill, decode)
    else:
        d.kill(prefill)
        d.step_until(f"noticed {prefill} lost", lambda: d.failed(prefill))
        d.add(3)  # while the prefill group is down: they go to the other one
        d.step_until(f"decoded on {decode} again", decoding)
        d.kill(decode)
    d.step_until("noticed both groups lost", lambda: d.failed(prefill) and d.failed(decode))
    d.add(4)  # while both are down: the healthy groups take them
    for _ in range(3):
        d.step()
    assert sorted(d.rebuild_failed()) == sorted([prefill, decode])
    assert all(g.healthy for g in engine.groups)
    assert {g.name: g.restarts - restarts[g.name] for g in engine.groups} == {
        g.name: int(g.name in (prefill, decode)) for g in engine.groups}
    d.add(4)  # the rejoined groups serve too
    d.finish()
    d.check_streams()
    assert engine.num_resent > resent  # the kills really moved requests


def test_groups_failed_but_not_yet_marked_are_skipped_when_placing(engine, driver):
    """A group whose ranks are gone but whose failure no step has seen yet refuses requests
    (RuntimeError): placing one there marks the group failed and takes the next one."""
    d = driver
    d.add(6)
    for name in ("prefill-0", "decode-0"):  # as if their ranks had just died, unnoticed
        engine.group(name).engine.fail_all("simulated: rank 0 closed its pipe")
        assert engine.group(name).healthy
    d.finish()
    d.check_streams()
    assert d.failed("prefill-0") and d.failed("decode-0")
    assert not d.failed("prefill-1") and not d.failed("decode-1")


def test_decode_group_lost_right_after_admitting_streams_the_first_token(engine, driver):
    """Decode admits the request with its first token (reported at its next step); the group
    dies before that step: the client still gets the first token, from the next group."""
    d = driver
    d.add(1)
    d.step_until("admitted on a decode group", lambda: any(g.engine.num_running for g in engine.decodes))
    [decode] = [g.name for g in engine.decodes if g.engine.num_running]
    d.kill(decode)
    d.finish()
    d.check_streams()
    assert d.failed(decode)
