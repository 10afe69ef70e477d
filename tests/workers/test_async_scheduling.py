"""Async scheduling (step n+1 scheduled while step n runs, placeholder tokens filled in on the
device): greedy output stays token-exact with transformers through stop tokens, max_tokens,
chunked prefill, preemption, aborts and tp = 2 rank processes, and no block leaks. On by default only
on CUDA; these tests force it on the CPU, where the same code paths run."""

from __future__ import annotations

import pytest

from splitserve import LLM, SamplingParams
from splitserve.workers.config import ParallelConfig, SchedulerConfig
from splitserve.workers.engine import EngineConfig, LLMEngine
from splitserve.workers.step_batch import StepBatch

from prompt_helpers import random_prompts

VOCAB = 200  # below the tiny models' vocabularies


def _count_fills(engine: LLMEngine) -> list[int]:
    """Wrap the executor's submit: the list grows by each batch's placeholder rows."""
    fills: list[int] = []
    submit = engine.executor_for_tests.submit

    def counting(batch: StepBatch) -> None:
        fills.append(len(batch.fill_rows))
        submit(batch)

    engine.executor_for_tests.submit = counting
    return fills


@pytest.fixture(scope="module")
def tiny_async(tiny_models):
    path, oracle = tiny_models("tiny-llama")
    # A small token budget (chunked prefill) and a small cache (preemption) on purpose.
    llm = LLM(str(path), show_progress=False, async_scheduling=True, max_num_batched_tokens=24,
              num_kv_blocks=24, block_size=4, max_model_len=96)
    return llm, oracle


def test_off_by_default_on_cpu_and_refused_with_pipeline_stages():
    assert not LLM("random:tiny-llama", show_progress=False).engine.async_scheduling
    with pytest.raises(ValueError, match="pp = 1"):
        LLMEngine(EngineConfig(model="random:tiny-llama", show_progress=False,
                               scheduler=SchedulerConfig(async_scheduling=True),
                               parallel=ParallelConfig(pipeline_parallel_size=2)))


def test_greedy_matches_transformers_with_chunks_and_preemption(tiny_async):
    llm, oracle = tiny_async
    fills = _count_fills(llm.engine)
    prompts = random_prompts(VOCAB, [5, 30, 12, 9, 17, 6, 28, 11, 22, 8], seed=3)
    lengths = [1, 2, 7, 20, 33, 3, 12, 40, 5, 25]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    outs = llm.generate(prompts, params)
    for prompt, n, out in zip(prompts, lengths, outs):
        assert out.token_ids == oracle(prompt, n)[:n] and len(out.token_ids) == n
    assert sum(fills) > 0, "no step was scheduled ahead: async scheduling did not engage"
    assert llm.engine.scheduler.num_preemptions > 0, "the small cache was meant to preempt"


def test_stop_token_one_step_ahead_is_discarded(tiny_async):
    """The step after a stop token is already queued when the stop is seen: its token is
    dropped, the output ends at the stop, and its blocks still come back."""
    llm, oracle = tiny_async
    prompt = random_prompts(VOCAB, [8], seed=11)[0]
    reference = oracle(prompt, 12)[:12]
    stop = reference[4]
    cut = reference.index(stop) + 1
    [out] = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                  stop_token_ids=[stop]))
    assert out.token_ids == reference[:cut] and out.finish_reason == "stop"


def test_abort_with_two_steps_in_flight(tiny_async):
    llm, oracle = tiny_async
    engine = llm.engine
    prompts = random_prompts(VOCAB, [6, 10, 8], seed=5)
    for i, p in enumerate(prompts):
        engine.add_request(f"ab{i}", p, SamplingParams(max_tokens=15, temperature=0.0, ignore_eos=True))
    finished = {}
    for _ in range(4):
        for out in engine.step():
            finished[out.request_id] = out
    assert engine.in_flight
    engine.abort_request("ab1")
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished[out.request_id] = out
    assert finished["ab1"].finish_reason == "abort"
    for i in (0, 2):
        assert finished[f"ab{i}"].token_ids == oracle(prompts[i], 15)[:15]


def test_smollm2_stops_at_eos_like_transformers(smollm2_dir, smollm2_oracle, smollm2_tokenizer):
    llm = LLM(str(smollm2_dir), show_progress=False, async_scheduling=True, max_model_len=256)
    fills = _count_fills(llm.engine)
    texts = ["The capital of France is", "Write one word:"]
    prompts = [smollm2_tokenizer.encode(t) for t in texts]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == smollm2_oracle(prompt, 24)
    assert sum(fills) > 0


def test_tp2_rank_processes_run_ahead(tiny_models):
    """Two tp ranks in their own processes: each queues step n+1 before step n's tokens reach
    the driver, and the output rank's samples reach its peer on the device for the placeholders."""
    path, oracle = tiny_models("tiny-llama")
    engine = LLMEngine(EngineConfig(model=str(path), show_progress=False,
                                    parallel=ParallelConfig(tensor_parallel_size=2),
                                    scheduler=SchedulerConfig(async_scheduling=True)))
    try:
        fills = _count_fills(engine)
        llm = LLM.from_engine(engine)
        prompts = random_prompts(VOCAB, [4, 12, 7, 9], seed=9)
        lengths = [10, 3, 14, 7]
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
        outs = llm.generate(prompts, params)
        assert [o.token_ids for o in outs] == [oracle(p, n)[:n] for p, n in zip(prompts, lengths)]
        assert sum(fills) > 0
    finally:
        engine.shutdown()


def test_runner_refuses_placeholders_from_another_step(tiny_async):
    llm, _ = tiny_async
    runner = llm.engine.executor_for_tests.runner
    batch = StepBatch(input_ids=[0], positions=[0], slot_mapping=[0], num_decode=1, decode_block_tables=[[0]],
                      decode_context_lens=[1], prefills=[], logits_indices=[0], sample_rows=[],
                      step_id=10**6, fill_rows=[0], fill_from=[0])
    with pytest.raises(RuntimeError, match="placeholders"):
        runner.execute_async(batch)


def test_disaggregated_groups_schedule_ahead(tiny_models):
    """Prefill (one token per request: never scheduled ahead) and decode groups, one of them a
    rank process, with async scheduling: token-exact, nothing left open."""
    path, oracle = tiny_models("tiny-llama")
    with LLM(str(path), mode="disaggregated", show_progress=False, async_scheduling=True) as llm:
        prompts = random_prompts(VOCAB, [5, 11, 7], seed=21)
        outs = llm.generate(prompts, SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True))
        assert [o.token_ids for o in outs] == [oracle(p, 9)[:9] for p in prompts]
        assert all(g.engine.async_scheduling for g in llm.engine.groups)
