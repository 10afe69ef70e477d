"""workers/model_runner.py: one rank's forward for a `StepBatch`, on CPU, against transformers
over the same weights (the tiny random Llama of `tiny_models`): the logits of the sampling
rows, the greedy tokens, and the K/V each token leaves in its cache slot (and nowhere else),
through a prefill, a chunked prefill, decode rows and a mixed step. Batches are written by
hand so that only the runner is under test."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from splitserve.workers.config import ModelConfig
from splitserve.workers.kv_cache import KVCacheSpec
from splitserve.workers.model_runner import ModelRunner
from splitserve.workers.model_source import random_config
from splitserve.workers.parallel import ParallelState
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.step_batch import ChunkPlan, SampleRow, StepBatch, rank_sampling
from splitserve.workers.weights import iter_safetensors

BS = 4
NUM_BLOCKS = 12
GREEDY = rank_sampling(SamplingParams(temperature=0.0))
PROMPT = [11, 42, 7, 99, 3, 250]  # 6 tokens: one full block and half of the next


@pytest.fixture(scope="module")
def hf(tiny_models):
    path, oracle = tiny_models("tiny-llama")
    return path, oracle.model


@pytest.fixture
def runner(hf) -> ModelRunner:
    path, _ = hf
    cfg = ModelConfig.from_hf(random_config("tiny-llama"))
    parallel = ParallelState.single()
    spec = KVCacheSpec.for_rank(cfg, parallel.mapping, NUM_BLOCKS, BS, torch.float32)
    runner = ModelRunner.create(cfg, parallel, spec, torch.device("cpu"), (2,), iter_safetensors(path, False))
    runner.logits_seen = []  # every compute_logits result, in order
    compute = runner.model.compute_logits

    def recording(hidden):
        logits = compute(hidden)
        runner.logits_seen.append(logits.clone())
        return logits
    runner.model.compute_logits = recording
    return runner


def hf_forward(model, ids: list[int]):
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=True)


def slots(blocks: list[int], positions) -> list[int]:
    return [blocks[p // BS] * BS + p % BS for p in positions]


def prefill(ids: list[int], blocks: list[int], start: int = 0, step_id: int = 1,
            sample_every_row: bool = False) -> StepBatch:
    """One chunk: tokens ``ids`` at positions ``start..``, with ``start`` already cached."""
    n = len(ids)
    rows = list(range(n)) if sample_every_row else [n - 1]
    return StepBatch(input_ids=list(ids), positions=list(range(start, start + n)),
                     slot_mapping=slots(blocks, range(start, start + n)), num_decode=0, decode_block_tables=[],
                     decode_context_lens=[], prefills=[ChunkPlan(0, n, start + n, list(blocks))],
                     logits_indices=rows, sample_rows=[SampleRow("r", GREEDY, 0) for _ in rows], step_id=step_id)


def decode(token: int, position: int, blocks: list[int], step_id: int, num_output: int) -> StepBatch:
    return StepBatch(input_ids=[token], positions=[position], slot_mapping=slots(blocks, [position]), num_decode=1,
                     decode_block_tables=[list(blocks)], decode_context_lens=[position + 1], prefills=[],
                     logits_indices=[0], sample_rows=[SampleRow("r", GREEDY, num_output)], step_id=step_id)


def run(runner: ModelRunner, batch: StepBatch) -> list[int]:
    return runner.execute_async(batch).result().token_ids


def test_prefill_logits_and_tokens_match_transformers_at_every_row(runner, hf):
    _, model = hf
    want = hf_forward(model, PROMPT).logits[0]
    tokens = run(runner, prefill(PROMPT, [7, 3], sample_every_row=True))
    [logits] = runner.logits_seen
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    assert tokens == want.argmax(-1).tolist()


def test_prefill_writes_each_tokens_kv_to_its_slot_and_nowhere_else(runner, hf):
    _, model = hf
    blocks = [7, 3]
    run(runner, prefill(PROMPT, blocks))
    cache = runner.kv_cache.data  # [layer, k|v, block, offset, kv head, dim]
    layers, _, _, _, heads, dim = cache.shape
    flat = cache.view(layers, 2, NUM_BLOCKS * BS, heads, dim)
    written = slots(blocks, range(len(PROMPT)))
    assert written == [28, 29, 30, 31, 12, 13]
    hf_cache = hf_forward(model, PROMPT).past_key_values
    for layer in range(layers):
        hf_layer = hf_cache.layers[layer]
        # transformers keeps [batch, kv head, position, dim]; the paged cache [slot, kv head, dim]
        torch.testing.assert_close(flat[layer, 0, written], hf_layer.keys[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(flat[layer, 1, written], hf_layer.values[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    untouched = torch.ones(NUM_BLOCKS * BS, dtype=torch.bool)
    untouched[written] = False
    assert flat[:, :, untouched].abs().sum().item() == 0.0
    assert flat[:, :, written].abs().amin(dim=(0, 1, 3, 4)).gt(0).all()  # every written slot holds data


def test_decode_steps_continue_from_the_cache_like_transformers(runner, hf):
    _, model = hf
    blocks = [5, 9]
    ids = list(PROMPT)
    [token] = run(runner, prefill(ids, blocks))
    for step in range(3):  # positions 6 and 7 fill block 9; position 8 needs a third block
        if len(ids) + 1 > len(blocks) * BS:
            blocks.append(0)
        expected = hf_forward(model, ids).logits[0, -1]
        assert token == expected.argmax().item()
        ids.append(token)
        [token] = run(runner, decode(token, len(ids) - 1, blocks, step_id=2 + step, num_output=step + 1))
        torch.testing.assert_close(runner.logits_seen[-1][0], hf_forward(model, ids).logits[0, -1],
                                   atol=1e-4, rtol=1e-4)
    assert runner.kv_cache.data[:, :, 0, 0].abs().sum() > 0  # position 8 went to block 0, offset 0


def test_a_chunked_prefill_matches_one_whole_prefill(runner, hf):
    _, model = hf
    blocks = [2, 6]
    assert run(runner, prefill(PROMPT[:4], blocks, step_id=1)) is not None
    [token] = run(runner, prefill(PROMPT[4:], blocks, start=4, step_id=2))
    want = hf_forward(model, PROMPT).logits[0, -1]
    torch.testing.assert_close(runner.logits_seen[-1][0], want, atol=1e-4, rtol=1e-4)
    assert token == want.argmax().item()


def test_a_mixed_step_serves_a_decode_row_and_a_prefill_chunk(runner, hf):
    """Row 0 decodes sequence a (prompt PROMPT, blocks [1, 4]); rows 1.. prefill sequence b
    (blocks [8, 10]) in the same forward: each gets transformers' next token."""
    _, model = hf
    other = [17, 18, 19, 20, 21]
    [first] = run(runner, prefill(PROMPT, [1, 4]))
    a_ids = PROMPT + [first]
    pos = len(PROMPT)
    batch = StepBatch(
        input_ids=[first] + other, positions=[pos] + list(range(5)),
        slot_mapping=slots([1, 4], [pos]) + slots([8, 10], range(5)), num_decode=1,
        decode_block_tables=[[1, 4]], decode_context_lens=[pos + 1],
        prefills=[ChunkPlan(1, 5, 5, [8, 10])], logits_indices=[0, 5],
        sample_rows=[SampleRow("a", GREEDY, 1), SampleRow("b", GREEDY, 0)], step_id=2)
    tokens = run(runner, batch)
    want_a = hf_forward(model, a_ids).logits[0, -1]
    want_b = hf_forward(model, other).logits[0, -1]
    torch.testing.assert_close(runner.logits_seen[-1], torch.stack([want_a, want_b]), atol=1e-4, rtol=1e-4)
    assert tokens == [want_a.argmax().item(), want_b.argmax().item()]


def test_an_empty_step_runs_nothing(runner):
    empty = StepBatch(input_ids=[], positions=[], slot_mapping=[], num_decode=0, decode_block_tables=[],
                      decode_context_lens=[], prefills=[], logits_indices=[], sample_rows=[], step_id=1)
    assert run(runner, empty) == [] and runner.logits_seen == []
    assert runner.kv_cache.data.abs().sum().item() == 0.0


def test_placeholders_take_the_previous_steps_samples_on_the_device(runner, hf):
    """Async scheduling: step 2's row holds a placeholder (0) that the runner replaces with
    step 1's sampled token before the forward; the result equals feeding the token itself."""
    _, model = hf
    blocks = [3, 11]
    [first] = run(runner, prefill(PROMPT, blocks, step_id=1))
    batch = decode(0, len(PROMPT), blocks, step_id=2, num_output=1)
    batch = dataclasses.replace(batch, fill_rows=[0], fill_from=[0])
    [second] = run(runner, batch)
    want = hf_forward(model, PROMPT + [first]).logits[0, -1]
    torch.testing.assert_close(runner.logits_seen[-1][0], want, atol=1e-4, rtol=1e-4)
    assert second == want.argmax().item()


def test_warm_up_forwards_run_each_size_and_leave_the_cache_empty(runner):
    """Start-up's scratch prefills (`ModelRunner.warm_up_forwards`, CUDA only in `create`, run
    here by hand): one forward per size, the largest first, the blocks they wrote zeroed; a
    size longer than the model's positions runs as several sequences; a size past the cache
    is refused before anything runs."""
    seen = []
    forward = runner.model.forward

    def counting(input_ids, positions, kv_caches, meta, *args, **kwargs):
        seen.append((len(input_ids), [(c.num_tokens, c.block_table.tolist()) for c in meta.prefills]))
        assert positions.max() < runner.model_cfg.max_position_embeddings
        return forward(input_ids, positions, kv_caches, meta, *args, **kwargs)
    runner.model.forward = counting
    runner.warm_up_forwards([1, 5, 9])
    assert [n for n, _ in seen] == [9, 5, 1] and seen[0][1] == [(9, [0, 1, 2])]
    assert not runner.kv_cache.data.any()
    runner.model_cfg = dataclasses.replace(runner.model_cfg, max_position_embeddings=8)
    assert runner._scratch_limit(1000) == NUM_BLOCKS * BS  # 8-token sequences fill 2 blocks each
    runner.warm_up_forwards([20])
    assert seen[-1] == (20, [(8, [0, 1]), (8, [2, 3]), (4, [4])])
    assert not runner.kv_cache.data.any()
    with pytest.raises(ValueError, match="do not fit"):
        runner.warm_up_forwards([NUM_BLOCKS * BS + 1])
    assert len(seen) == 4
