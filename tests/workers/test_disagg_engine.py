"""Disaggregated mode: a prefill group and a decode group, KV moved by the transfer service.

Greedy output is token-exact with aggregated mode and with transformers for every pairing
of layouts; each fault (prefill killed mid-transfer, acknowledgement dropped, decode out of
blocks, transfer delayed past its deadline) ends with every request recomputed (or failed
with a clear error under the "fail" policy) within its deadline, and the shared leak check
(conftest.py) finds no block, reservation or transfer left on either side.
"""

from __future__ import annotations

import time

import pytest
from prompt_helpers import random_prompts

from splitserve import LLM, SamplingParams
from splitserve.kvtransfer.messages import FaultConfig
from splitserve.workers.sequence import Sequence

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def _disagg(model, p=(1, 1), d=(1, 1), **kw) -> LLM:
    kw.setdefault("block_size", 4)
    return LLM(str(model), mode="disaggregated", prefill_tp=p[0], prefill_pp=p[1], decode_tp=d[0],
               decode_pp=d[1], show_progress=False, **kw)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    folder, oracle = tiny_models("tiny-llama")
    prompts = random_prompts(oracle.model.config.vocab_size, [5, 33, 18, 70])
    return folder, prompts, [oracle(p, GREEDY.max_tokens) for p in prompts]


@pytest.mark.parametrize(("p", "d"), [
    ((1, 1), (1, 1)),  # both groups in this process: the in-process transport
    ((2, 1), (1, 1)),
    ((1, 1), (2, 1)),
    ((2, 1), (2, 1)),
    ((1, 2), (1, 1)),
    ((1, 1), (1, 2)),
])
def test_layouts_match_transformers(p, d, tiny):
    folder, prompts, expected = tiny
    with _disagg(folder, p, d) as llm:
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == expected
        assert llm.engine.metrics.num_transfers == len(prompts) and llm.engine.metrics.num_failures == 0


def test_moe_prefill_tp1_decode_tp2_matches_transformers(tiny_models):
    # The KV layout does not change with experts: a one-rank prefill hands over to tp 2 ranks
    # that each hold a slice of every expert.
    folder, oracle = tiny_models("tiny-qwen3-moe")
    prompts = random_prompts(oracle.model.config.vocab_size, [5, 33, 18])
    with _disagg(folder, (1, 1), (2, 1)) as llm:
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == [oracle(p, GREEDY.max_tokens) for p in prompts]
        assert llm.engine.metrics.num_transfers == len(prompts) and llm.engine.metrics.num_failures == 0


def test_smollm2_prefill_tp3_matches_transformers(smollm2_dir, smollm2_tokenizer, smollm2_oracle):
    texts = ["The capital of France is", "def add(a, b):", "Water boils at"]
    prompts = [smollm2_tokenizer.encode(t) for t in texts]
    with _disagg(smollm2_dir, (3, 1), (1, 1), block_size=16, max_model_len=256) as llm:
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == [smollm2_oracle(p, GREEDY.max_tokens) for p in prompts]
        assert outs[0].text == smollm2_tokenizer.decode(outs[0].token_ids, skip_special_tokens=True)


def test_decode_prefix_cache_hit_sends_only_the_rest(tiny):
    folder, prompts, expected = tiny
    with _disagg(folder) as llm:
        [first] = llm.generate(prompts[3:], GREEDY)
        sent_first = llm.engine.metrics.num_bytes
        [again] = llm.generate(prompts[3:], GREEDY)  # decode holds the prompt's full blocks
        assert first.token_ids == again.token_ids == expected[3]
        assert llm.engine.metrics.num_bytes - sent_first < sent_first / 4


# --- faults -------------------------------------------------------------------------------------


def test_prefill_killed_mid_transfer_recomputes(tiny):
    folder, prompts, expected = tiny
    faults = FaultConfig(kill_prefill_rank=1, kill_on_transfer=1)
    with _disagg(folder, (2, 1), (1, 1), faults=faults, transfer_timeout_s=10) as llm:
        start = time.monotonic()
        outs = llm.generate(prompts, GREEDY)
        assert time.monotonic() - start < 30
        assert [o.token_ids for o in outs] == expected  # recomputed on decode, still exact
        assert llm.engine.prefill.failure is not None and llm.engine.metrics.num_failures >= 1


def test_dropped_ack_times_out_and_recomputes(tiny):
    folder, prompts, expected = tiny
    with _disagg(folder, faults=FaultConfig(drop_ack_of_transfer=0), transfer_timeout_s=1.0) as llm:
        start = time.monotonic()
        outs = llm.generate(prompts, GREEDY)
        assert time.monotonic() - start < 10
        assert [o.token_ids for o in outs] == expected
        m = llm.engine.metrics
        assert m.num_timeouts == 1 and m.num_transfers == len(prompts) - 1


def test_transfer_delayed_past_deadline_recomputes_and_pair_still_works(tiny):
    folder, prompts, expected = tiny
    faults = FaultConfig(delay_transfer=0, delay_s=3.0)
    with _disagg(folder, (2, 1), (1, 1), faults=faults, transfer_timeout_s=1.0) as llm:
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == expected
        m = llm.engine.metrics
        # one prefill step pushes all four: the delay stalls it, so every transfer is late
        assert m.num_timeouts == 4 and m.num_transfers == 0 and m.num_bytes == 0
        # the late messages did not break the pairs: later transfers still go through them
        assert [o.token_ids for o in llm.generate(prompts[:2], GREEDY)] == expected[:2]
        assert m.num_transfers == 2


def test_decode_out_of_blocks_waits_for_blocks(tiny):
    folder, prompts, expected = tiny
    # 24 blocks of 4: the long prompt reserves 18, the others wait for blocks instead of
    # falling back to prefilling on decode.
    with _disagg(folder, num_kv_blocks=24) as llm:
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == expected
        assert llm.engine.metrics.num_transfers == len(prompts) and llm.engine.metrics.num_failures == 0


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_decode_out_of_blocks_past_the_queue_timeout(policy, tiny):
    from splitserve.workers.config import CacheConfig
    from splitserve.workers.disagg_engine import DisaggConfig, DisaggEngine
    from splitserve.workers.engine import EngineConfig

    folder, prompts, expected = tiny
    base = EngineConfig(model=str(folder), show_progress=False, cache=CacheConfig(block_size=4, num_blocks=24))
    engine = DisaggEngine(DisaggConfig(prefill=base, decode=base, failure_policy=policy, queue_timeout_s=0.0))
    with LLM.from_engine(engine) as llm:
        outs = llm.generate(prompts, GREEDY)
        if policy == "recompute":
            assert [o.token_ids for o in outs] == expected
        else:
            failed = [o for o in outs if o.error]
            assert failed and all("no free KV blocks" in o.error and o.finish_reason == "abort" for o in failed)
            assert all(o.token_ids == e for o, e in zip(outs, expected) if not o.error)


def test_incompatible_block_sizes_fail_at_connect(tiny):
    from dataclasses import replace

    from splitserve.workers.config import CacheConfig
    from splitserve.workers.disagg_engine import DisaggConfig, DisaggEngine
    from splitserve.workers.engine import EngineConfig

    folder, _, _ = tiny
    base = EngineConfig(model=str(folder), show_progress=False)
    with pytest.raises(ValueError, match="block size"):
        DisaggEngine(DisaggConfig(prefill=base, decode=replace(base, cache=CacheConfig(block_size=8))))


def test_abort_before_prefill_ends_the_request_without_decoding(tiny):
    folder, prompts, _ = tiny
    with _disagg(folder) as llm:
        engine = llm.engine
        engine.add_request("a", prompts[3], GREEDY)
        engine.add_request("b", prompts[0], GREEDY)
        engine._dispatch_queued()  # both reserved, prefill not run yet
        engine.abort_request("a")
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                done[out.request_id] = out
        assert done["a"].finish_reason == "abort" and done["a"].token_ids == [] and "aborted" in done["a"].error
        assert done["b"].finish_reason in ("stop", "length") and len(done["b"].token_ids) > 0
        assert engine.metrics.num_failures == 0  # an abort is not a failure of the service


def test_request_id_in_use_on_decode_is_refused(tiny):
    folder, prompts, _ = tiny
    with _disagg(folder) as llm:
        engine = llm.engine
        engine.add_request("x", prompts[0], SamplingParams(max_tokens=20, temperature=0.0))
        while not engine.decode.has_request("x"):
            engine.step()
        with pytest.raises(ValueError, match="already in use"):
            engine.add_request("x", prompts[1], GREEDY)
        while engine.has_unfinished_requests():
            engine.step()


def run_to_end(engine, request_id: str, prompt: list[int], params: SamplingParams, cache_salt: str | None):
    engine.add_request(request_id, prompt, params, cache_salt=cache_salt)
    final = None
    while engine.has_unfinished_requests():
        final = next((o for o in engine.step() if o.finished and o.request_id == request_id), final)
    return final


def test_cache_salt_partitions_both_roles_prefix_caches(tiny):
    """Decode's reservation and prefill's computation hash alike: another salt reuses
    nothing on either side (the whole prompt is sent again, cached_tokens 0); the same salt
    reuses decode's blocks (little is sent) and reports the hits; output is token-exact."""
    folder, prompts, expected = tiny
    with _disagg(folder) as llm:
        engine = llm.engine
        bs = engine.decode.kv_usage().block_size
        full = (len(prompts[3]) - 1) // bs * bs
        sent = []
        for rid, salt, hits in [("a", "tenant-a", 0), ("b", "tenant-b", 0), ("a2", "tenant-a", full),
                                ("none", None, 0)]:
            before = engine.metrics.num_bytes
            out = run_to_end(engine, rid, prompts[3], GREEDY, salt)
            sent.append(engine.metrics.num_bytes - before)
            assert (out.num_cached_tokens, out.token_ids) == (hits, expected[3]), rid
        assert sent[1] == sent[0] == sent[3] and sent[2] < sent[0] / 4
        # Prefill's own cache is salted too: only the same salt finds its blocks there.
        probe = lambda salt: engine.prefill.block_manager_for_tests.find_cached_prefix(  # noqa: E731
            Sequence("probe", list(prompts[3]), GREEDY, cache_salt=salt)).num_blocks
        assert probe("tenant-a") == probe(None) == full // bs and probe("tenant-c") == 0


def test_cache_salt_is_checked_before_queueing(tiny):
    folder, prompts, _ = tiny
    with _disagg(folder) as llm:
        with pytest.raises(ValueError, match="cache_salt"):
            llm.engine.add_request("r", prompts[0], GREEDY, cache_salt="")
        assert not llm.engine.has_unfinished_requests()
