"""Query of death (issue 15, #7): a request that makes a rank raise is found and failed, alone;
it is never re-sent to take down group after group, and every other request finishes
token-exact with transformers.

The rank raises through the test-only hook `RAISE_ON_TOKEN_ENV` (executor.py): a step whose
input ids hold a poison token raises before the forward (as a bug in the model would), or, for
the second poison, in sampling (as bad sampling values would). The poisons are tokens that no
innocent prompt or output contains. Groups are one-rank groups of rank processes:
- aggregated groups survive a Python exception: only the batch is lost, no group is rebuilt;
- a prefill group whose step raised mid-forward while pushing KV ends (its KV messages are
  half sent), and is the only group the culprit costs: the suspects of its batch run whole on
  the decode group, isolated, where the culprit raises alone and fails;
- an exception of sampling leaves even a prefill group up.
The offline engine (one rank in its own process) gets the same treatment.
"""

from __future__ import annotations

import os

import pytest
from launch_helpers import build_group
from prompt_helpers import random_prompts

from splitserve import LLM, SamplingParams
from splitserve.workers.config import CacheConfig
from splitserve.workers.disagg_engine import DisaggConfig, DisaggEngine
from splitserve.workers.engine import EngineConfig
from splitserve.workers.executor import RAISE_ON_TOKEN_ENV, WorkerGroupError

MAX_TOKENS = 12
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)


class Poisons:
    """Innocent prompts, their expected outputs, and two tokens none of them contains."""

    def __init__(self, oracle, vocab_size: int):
        self.oracle = oracle
        self.innocents = random_prompts(vocab_size, [6, 9, 5, 11, 7, 8, 10, 6, 9], seed=15)
        self.expected = [oracle(p, MAX_TOKENS) for p in self.innocents]
        seen = {t for ids in self.innocents + self.expected for t in ids}
        free = [t for t in range(3, vocab_size) if t not in seen]
        self.forward, self.sample = free[0], free[1]
        self.env = f"{self.forward},{self.sample}:sample"

    def culprit(self, token: int) -> list[int]:
        return [self.innocents[0][0], token, *self.innocents[1][:4]]


@pytest.fixture(scope="module")
def poisons(tiny_models):
    folder, oracle = tiny_models("tiny-llama")
    return folder, Poisons(oracle, oracle.model.config.vocab_size)


@pytest.fixture(scope="module")
def poisoned_env(poisons):
    """The hook is armed for the module's engines (built while it is set; rank processes
    inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(RAISE_ON_TOKEN_ENV, poisons[1].env)
        yield


def _run(engine, requests: dict[str, list[int]]) -> dict[str, object]:
    for rid, prompt in requests.items():
        engine.add_request(rid, prompt, PARAMS)
    final = {}
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert set(final) == set(requests)
    return final


def _check(final, p: Poisons, innocents: dict[str, int], culprit: str, raised_in: str) -> None:
    for rid, i in innocents.items():
        assert final[rid].error is None, (rid, final[rid].error)
        assert final[rid].token_ids == p.expected[i], rid
    bad = final[culprit]
    assert bad.finish_reason == "abort" and bad.error_code == "INTERNAL"  # not UNAVAILABLE: never worth a retry
    assert "alone in its step" in bad.error and "not retried" in bad.error
    assert raised_in in bad.error
    assert bad.token_ids == []


def _wave(p: Poisons, tag: str, indices: list[int], poison: int) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Innocents around one culprit (in the middle: batched with them)."""
    innocents = {f"{tag}{i}": i for i in indices}
    requests = {rid: p.innocents[i] for rid, i in list(innocents.items())[:2]}
    requests[f"{tag}-bad"] = p.culprit(poison)
    requests.update({rid: p.innocents[i] for rid, i in list(innocents.items())[2:]})
    return requests, innocents


def test_aggregated_groups_survive_the_culprit_and_never_resend_it(poisons, poisoned_env):
    folder, p = poisons
    base = EngineConfig(model=str(folder), show_progress=False, cache=CacheConfig(block_size=4, num_blocks=128))
    engine = DisaggEngine(DisaggConfig(prefill=None, decode=base, num_decode=2), engine_factory=build_group)
    try:
        pids = {g.name: g.engine.executor_for_tests.pids for g in engine.groups}
        for poison, raised_in, tag in [(p.forward, "InjectedStepFault", "f"), (p.sample, "SampleError", "s")]:
            requests, innocents = _wave(p, tag, [0, 1, 2, 3, 4], poison)
            final = _run(engine, requests)  # the first group takes them all: one batch with the culprit
            _check(final, p, innocents, f"{tag}-bad", raised_in)
        lone = _run(engine, {"lone": p.culprit(p.forward)})  # alone in its batch: failed at once
        assert "alone in its step" in lone["lone"].error
        assert not engine.failed_groups()
        assert {g.name: g.engine.executor_for_tests.pids for g in engine.groups} == pids  # nothing rebuilt
        assert engine.num_resent == 0  # the culprit (and everyone else) stayed on its group
        again = _run(engine, {"after": p.innocents[5]})  # the group serves on
        assert again["after"].token_ids == p.expected[5]
    finally:
        engine.shutdown()


def test_disaggregated_culprit_costs_at_most_its_prefill_group(poisons, poisoned_env):
    folder, p = poisons
    base = EngineConfig(model=str(folder), show_progress=False, cache=CacheConfig(block_size=4, num_blocks=128))
    engine = DisaggEngine(DisaggConfig(prefill=base, decode=base, num_prefill=2, num_decode=1,
                                       transfer_timeout_s=20.0), engine_factory=build_group)
    try:
        # Raised mid-forward in the step pushing the batch's KV: prefill-0 (the first in order,
        # so it had the whole batch) ends; its suspects run on decode, isolated, where the
        # culprit raises again, alone. Nothing else is lost.
        requests, innocents = _wave(p, "f", [0, 1, 2, 3], p.forward)
        final = _run(engine, requests)
        _check(final, p, innocents, "f-bad", "InjectedStepFault")
        assert [g.name for g in engine.failed_groups()] == ["prefill-0"]
        assert "raised in step" in engine.group("prefill-0").error
        assert engine.num_resent == len(requests)  # each suspect once, to decode; never to prefill-1

        # Raised in sampling: even the prefill group (prefill-1 now) goes on.
        resent = engine.num_resent
        requests, innocents = _wave(p, "s", [4, 5, 6, 7], p.sample)
        final = _run(engine, requests)
        _check(final, p, innocents, "s-bad", "SampleError")
        assert engine.num_resent == resent + len(requests)

        # Alone in its prefill batch: failed there and then, not re-sent at all.
        resent = engine.num_resent
        lone = _run(engine, {"lone": p.culprit(p.sample)})
        assert "alone in its step" in lone["lone"].error
        assert engine.num_resent == resent
        assert [g.name for g in engine.failed_groups()] == ["prefill-0"]

        # Alone, raised mid-forward: it costs its group (prefill-1) and nothing more.
        lone = _run(engine, {"lone2": p.culprit(p.forward)})
        assert "alone in its step" in lone["lone2"].error and lone["lone2"].error_code == "INTERNAL"
        assert engine.num_resent == resent
        assert [g.name for g in engine.failed_groups()] == ["prefill-0", "prefill-1"]
        again = _run(engine, {"after": p.innocents[8]})  # no prefill group left: decode computes it
        assert again["after"].token_ids == p.expected[8]
        assert not engine.group("decode-0").error
    finally:
        engine.shutdown()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_offline_engine_fails_only_the_culprit(poisons, poisoned_env, async_scheduling):
    """Async scheduling sends the next batch before the failed one is back: that batch is
    dropped too, and its requests computed again."""
    folder, p = poisons
    llm = LLM(str(folder), show_progress=False, async_scheduling=async_scheduling, max_num_batched_tokens=16,
              block_size=4)  # one rank, in this process; prompts in chunks over several steps
    prompts = [p.innocents[0], p.innocents[1], p.culprit(p.forward), p.innocents[2], p.culprit(p.sample)]
    outs = llm.generate(prompts, PARAMS)
    assert [o.token_ids for o in outs[:2] + outs[3:4]] == p.expected[:3]
    assert all(o.error is None for o in outs[:2] + outs[3:4])
    for out, raised_in in [(outs[2], "InjectedStepFault"), (outs[4], "SampleError")]:
        assert out.finish_reason == "abort" and "alone in its step" in out.error and raised_in in out.error
        assert out.error_code == "INTERNAL"
    assert os.environ[RAISE_ON_TOKEN_ENV] == p.env


def test_two_rank_group_goes_on_after_sampling_raised_and_ends_naming_the_step_otherwise(poisons, poisoned_env):
    """With tp = 2 a rank that raised mid-forward would leave its peer in a collective: the
    group ends, and the error names the step, whose lone request is judged the culprit.
    Sampling comes after every collective (tokens not shared): the group goes on."""
    folder, p = poisons
    with LLM(str(folder), show_progress=False, tensor_parallel_size=2) as llm:
        pids = llm.engine.executor_for_tests.pids
        outs = llm.generate([p.innocents[0], p.culprit(p.sample), p.innocents[1]], PARAMS)
        assert [outs[0].token_ids, outs[2].token_ids] == p.expected[:2]
        assert "alone in its step" in outs[1].error and "SampleError" in outs[1].error
        assert llm.engine.executor_for_tests.pids == pids and llm.engine.failure is None
        with pytest.raises(WorkerGroupError, match="raised in step .* and ends") as err:
            llm.generate([p.culprit(p.forward)], PARAMS)
        assert err.value.step_failure is not None and "InjectedStepFault" in err.value.step_failure.message
        assert [v[0] for v in llm.engine.blamed.values()] == ["culprit"]
