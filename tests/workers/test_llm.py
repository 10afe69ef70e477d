"""Greedy output of `LLM.generate` is token-exact with transformers `generate()`.

The oracle runs each prompt alone through transformers (float32, CPU); the engine runs them
together, with the batching features forced on: mixed lengths in one batch, tiny prefill
chunks, prefix-cache hits, and preemption under a tiny KV budget. The shared leak check in
conftest.py runs after each test.
"""

from __future__ import annotations

import pytest
from prompt_helpers import random_prompts

from splitserve import LLM, SamplingParams

MAX_TOKENS = 20

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3, 4,",
    "Explain why the sky is blue in two sentences.",
    "Q: What is 17 * 23?\nA:",
    "Translate to French: I like green apples and warm bread.",
    # a long one (~300 tokens) so the batch mixes very different lengths
    "Here is a list of facts about the solar system. " + " ".join(
        f"Fact {i}: planet number {i % 8 + 1} has an interesting orbit." for i in range(25)
    ) + " In summary,",
]

GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)


def _prompt_ids(tokenizer, prompts):
    return [tokenizer.encode(p) for p in prompts]


def _assert_exact(outputs, prompt_ids, oracle, max_tokens=MAX_TOKENS):
    for out, ids in zip(outputs, prompt_ids, strict=True):
        assert out.prompt_token_ids == ids
        assert out.token_ids == oracle(ids, max_tokens), f"mismatch for prompt {ids[:8]}..."


def test_mixed_batch_matches_transformers(smol_llm, smollm2_tokenizer, smollm2_oracle):
    ids = _prompt_ids(smollm2_tokenizer, PROMPTS)
    assert max(map(len, ids)) > 10 * min(map(len, ids))
    outputs = smol_llm.generate(PROMPTS, GREEDY)
    _assert_exact(outputs, ids, smollm2_oracle)
    assert all(o.finish_reason in ("stop", "length") for o in outputs)
    assert outputs[0].text == smollm2_tokenizer.decode(outputs[0].token_ids, skip_special_tokens=True)


def test_small_prefill_chunks_match(smollm2_dir, smollm2_tokenizer, smollm2_oracle):
    llm = LLM(str(smollm2_dir), show_progress=False, max_num_batched_tokens=24, block_size=8)
    ids = _prompt_ids(smollm2_tokenizer, PROMPTS)
    _assert_exact(llm.generate(ids, GREEDY), ids, smollm2_oracle)


def test_prefix_cache_hits_match(smol_llm, smollm2_tokenizer, smollm2_oracle):
    system = "You are a careful assistant. Answer briefly and truthfully. " * 6
    prompts = [system + q for q in ("Name a color.", "Name a fruit.", "Name a city.", "Name a river.")]
    ids = _prompt_ids(smollm2_tokenizer, prompts)
    first = smol_llm.generate(prompts[:1], GREEDY)
    rest = smol_llm.generate(prompts[1:], GREEDY)
    _assert_exact(first + rest, ids, smollm2_oracle)
    assert all(o.num_cached_tokens >= 64 for o in rest), [o.num_cached_tokens for o in rest]
    again = smol_llm.generate(prompts[:1], GREEDY)  # the whole prompt but its last block hits
    assert again[0].num_cached_tokens == (len(ids[0]) - 1) // 16 * 16
    _assert_exact(again, ids[:1], smollm2_oracle)


def test_preemption_under_tiny_kv_budget_matches(smollm2_dir, smollm2_tokenizer, smollm2_oracle):
    # All seven short prompts are admitted (~3 blocks of 4 each), but growing by 20 tokens
    # they need ~56 blocks of the 40: running sequences must be preempted and recomputed.
    llm = LLM(str(smollm2_dir), show_progress=False, num_kv_blocks=40, block_size=4, enable_prefix_caching=False)
    ids = _prompt_ids(smollm2_tokenizer, PROMPTS[:7])
    outputs = llm.generate(ids, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    _assert_exact(outputs, ids, smollm2_oracle)


# --- tiny random configs of each family ---------------------------------------------------------


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-llama3", "tiny-mistral", "tiny-qwen2", "tiny-qwen3",
                                    "tiny-qwen3-moe", "tiny-mixtral"])
def test_tiny_random_families_match(family, tiny_models):
    folder, oracle = tiny_models(family)
    prompts = random_prompts(oracle.model.config.vocab_size, [5, 17, 40, 90, 3, 64])
    llm = LLM(str(folder), show_progress=False, block_size=4, max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    for out, ids in zip(llm.generate(prompts, params), prompts):
        assert out.token_ids == oracle(ids, 24)
