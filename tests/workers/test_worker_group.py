"""Worker groups of tp x pp rank processes: token-exact with one process and with
transformers in every layout, and a killed rank fails `generate()` fast, leaving no process.

Each group spawns real processes that rendezvous over gloo on loopback; the shared leak
check (conftest.py) runs after each test on the driver's block manager, the one owner of
block ids for every rank.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from prompt_helpers import random_prompts

from splitserve import LLM, SamplingParams
from splitserve.workers.executor import WorkerGroupError

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
])
def test_tiny_layouts_match_single_process_and_transformers(family, tp, pp, tiny_models):
    folder, oracle = tiny_models(family)
    prompts = random_prompts(oracle.model.config.vocab_size, [6, 30, 70, 2])
    single = _generate(str(folder), 1, 1, prompts)
    assert single == [oracle(p, GREEDY.max_tokens) for p in prompts]
    assert _generate(str(folder), tp, pp, prompts) == single


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
    pids = llm.engine.executor.pids
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
