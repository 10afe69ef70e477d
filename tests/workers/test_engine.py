"""LLMEngine: bad input is refused with a clear ValueError and changes nothing; abort frees
blocks; streaming outputs add up to the final one; seeded sampling is reproducible."""

from __future__ import annotations

import pytest

from splitserve import LLM, SamplingParams
from splitserve.workers.engine import EngineConfig, LLMEngine


@pytest.fixture(scope="module")
def tiny_llm() -> LLM:
    return LLM("random:tiny-llama", show_progress=False, max_model_len=128)


@pytest.fixture(scope="module")
def smol(smollm2_dir) -> LLM:
    return LLM(str(smollm2_dir), show_progress=False, max_model_len=256)


def _works(llm: LLM) -> None:
    [out] = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0))
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
    ],
)
def test_bad_sampling_params_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_prompt_longer_than_max_length(tiny_llm):
    with pytest.raises(ValueError, match="too long.*128"):
        tiny_llm.generate([[3] * 200])
    _works(tiny_llm)


@pytest.mark.parametrize("prompt", [[], [[]]])
def test_empty_token_prompt(tiny_llm, prompt):
    if prompt == []:  # no prompts at all is not an error: nothing to do
        assert tiny_llm.generate(prompt) == []
        return
    with pytest.raises(ValueError, match="empty prompt"):
        tiny_llm.generate(prompt)
    _works(tiny_llm)


def test_empty_text_prompt(smol):
    with pytest.raises(ValueError, match="empty prompt"):
        smol.generate("")
    with pytest.raises(ValueError, match="empty prompt"):
        smol.generate(["fine", ""])  # one bad prompt: none of the batch is queued
    assert not smol.engine.has_unfinished_requests()


def test_out_of_vocab_token(tiny_llm):
    with pytest.raises(ValueError, match="out of range"):
        tiny_llm.generate([[1, 2, 10**6]])
    _works(tiny_llm)


def test_text_prompt_without_tokenizer(tiny_llm):
    with pytest.raises(ValueError, match="no tokenizer"):
        tiny_llm.generate("hello")


def test_request_larger_than_kv_cache():
    llm = LLM("random:tiny-llama", show_progress=False, num_kv_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate([[1] * 10], SamplingParams(max_tokens=20))
    _works(llm)


def test_unknown_model():
    with pytest.raises(ValueError, match="no-such-model"):
        LLM("no-such-model", show_progress=False)


def test_bad_batch_leaves_engine_untouched(tiny_llm):
    good, bad = [5, 6], [5] * 500
    with pytest.raises(ValueError):
        tiny_llm.generate([good, bad])
    assert not tiny_llm.engine.has_unfinished_requests()
    _works(tiny_llm)


def test_abort_frees_blocks_and_reports_abort(tiny_llm):
    engine = tiny_llm.engine
    engine.add_request("keep", [1, 2, 3], SamplingParams(max_tokens=6, temperature=0.0))
    engine.add_request("drop", [4, 5, 6, 7, 8], SamplingParams(max_tokens=50, temperature=0.0))
    engine.step()
    engine.abort_request("drop")
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["drop"].finish_reason == "abort"
    assert finished["keep"].finish_reason == "length" and len(finished["keep"].token_ids) == 6
    engine.abort_request("unknown-id")  # a no-op, not an error


def test_a_group_failing_frees_requests_aborted_while_their_batch_was_in_flight():
    """Their blocks wait for the batch to come back; a failed group's batch never does."""
    engine = LLMEngine(EngineConfig(model="random:tiny-llama", device="cpu", show_progress=False, max_model_len=128))
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=20, temperature=0.0))
    engine.submit()  # its prompt's batch is in flight
    engine.abort_request("r")
    kv = engine.kv_usage()
    assert kv.num_free_blocks < kv.num_blocks  # held for the batch
    engine.fail_all("the ranks died")
    kv = engine.kv_usage()
    assert kv.num_free_blocks == kv.num_blocks
    engine.shutdown()


def test_duplicate_request_id(tiny_llm):
    engine = tiny_llm.engine
    engine.add_request("same", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("same", [3, 4], SamplingParams(max_tokens=2))
    engine.abort_request("same")
    engine.step()


def test_streaming_deltas_add_up(smol):
    engine = smol.engine
    params = SamplingParams(max_tokens=12, temperature=0.0)
    engine.add_request("s", engine.tokenize("The capital of France is"), params, stream=True)
    ids, text, last = [], "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            ids += out.new_token_ids
            text += out.new_text
            last = out
    assert last.finished and ids == last.token_ids and text == last.text
    [plain] = smol.generate("The capital of France is", params)
    assert plain.token_ids == last.token_ids and plain.text == last.text


def test_stop_string_truncates(smol):
    [ref] = smol.generate("The capital of France is", SamplingParams(max_tokens=12, temperature=0.0))
    stop = ref.text[4:7]
    [out] = smol.generate("The capital of France is", SamplingParams(max_tokens=12, temperature=0.0, stop=[stop]))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == ref.text[: ref.text.index(stop)]


def test_seeded_sampling_is_reproducible_across_batches(tiny_llm):
    seeded = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    [alone] = tiny_llm.generate([[9, 8, 7]], seeded)
    batch = tiny_llm.generate([[1, 2], [9, 8, 7], [3, 3, 3, 3]],
                              [SamplingParams(max_tokens=5, temperature=0.7), seeded, SamplingParams(max_tokens=9)])
    assert batch[1].token_ids == alone.token_ids


def test_logprobs_returned(tiny_llm):
    [out] = tiny_llm.generate([[4, 5, 6]], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3))
    assert len(out.logprobs) == 4
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token and lp.rank == 1 and len(lp.top) == 3
        assert max(lp.top.values()) == pytest.approx(lp.logprob)


def test_chat_applies_template(smol):
    [out] = smol.chat([{"role": "user", "content": "Say hi."}], SamplingParams(max_tokens=4, temperature=0.0))
    tok = smol.get_tokenizer()
    expected = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True, tokenize=False)
    assert tok.decode(out.prompt_token_ids) == expected


def test_bad_dtype_is_clear():
    with pytest.raises(ValueError, match="dtype"):
        LLMEngine(EngineConfig(model="random:tiny-llama", dtype="float8", show_progress=False))


# ---- cache salts -------------------------------------------------------------------------------


def run_to_end(engine, request_id: str, prompt: list[int], params: SamplingParams, cache_salt: str | None):
    """One request alone on ``engine`` (an `LLMEngine` or a `DisaggEngine`): its final output."""
    engine.add_request(request_id, prompt, params, cache_salt=cache_salt)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id == request_id:
                final = out
    return final


def test_cache_salt_partitions_the_prefix_cache(tiny_llm):
    """A second caller with another salt (or none) gets no hit on a prefix the first cached,
    so its cached_tokens reveals nothing; the same salt hits; greedy output never changes."""
    from prompt_helpers import random_prompts

    engine = tiny_llm.engine
    [prompt] = random_prompts(engine.model_cfg.vocab_size, [41], seed=15)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    bs = engine.kv_usage().block_size
    full = (len(prompt) - 1) // bs * bs
    first = run_to_end(engine, "salt-a", prompt, params, "tenant-a")
    assert first.num_cached_tokens == 0
    for rid, salt, hits in [("salt-b", "tenant-b", 0), ("unsalted", None, 0), ("salt-a2", "tenant-a", full),
                            ("unsalted2", None, full), ("salt-b2", "tenant-b", full)]:
        out = run_to_end(engine, rid, prompt, params, salt)
        assert (out.num_cached_tokens, out.token_ids) == (hits, first.token_ids), rid


@pytest.mark.parametrize("salt", ["", "x" * 1025])
def test_bad_cache_salt_is_refused(tiny_llm, salt):
    with pytest.raises(ValueError, match="cache_salt"):
        tiny_llm.engine.add_request("bad-salt", [1, 2, 3], SamplingParams(max_tokens=2), cache_salt=salt)
    assert not tiny_llm.engine.has_request("bad-salt")
