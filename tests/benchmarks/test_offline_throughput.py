"""benchmarks/offline_throughput.py in --quick mode, on a tiny Llama both systems load.

A `random:` model exists only inside splitserve, so the test saves a tiny transformers Llama
(safetensors, no tokenizer) and points the benchmark at that folder instead.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "offline_throughput.py"


@pytest.fixture(scope="module")
def bench():
    """The benchmark script as a module (it is a script, not part of the installed package)."""
    spec = importlib.util.spec_from_file_location("offline_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A seeded tiny Llama saved as a Hugging Face folder: config + safetensors, no tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=512, max_position_embeddings=256)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def restore_torch_threads():
    """The benchmark sets torch's thread count for the whole process; put it back afterwards."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_quick_run_writes_both_systems(bench, tiny_llama_dir: Path, tmp_path: Path, restore_torch_threads):
    out = tmp_path / "x.json"
    # One thread: a tiny model's ops are too small to share, and CI machines are often busy.
    argv = ["--model", str(tiny_llama_dir), "--quick", "--no-progress", "--num-threads", "1",
            "--kv-cache-gib", "0.01", "--out", str(out)]
    report = bench.main(argv)

    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["systems"]) == {"splitserve", "transformers"}
    for result in saved["systems"].values():
        assert result["tokens_per_s"] > 0
        assert result["output_tokens"] == saved["workload"]["total_output_tokens"]
    assert saved["workload"]["num_prompts"] == 6
    match = saved["greedy_match"]
    assert match["num_requests"] == 6 and 0 <= match["num_exact_match"] <= 6
    assert saved["target_ratio"] == bench.TARGET_RATIO and isinstance(saved["target_met"], bool)
    assert saved["device"]["num_threads"] == 1
    assert out.with_suffix(".png").stat().st_size > 0


def test_workload_is_seeded_and_in_range(bench):
    workload = bench.Workload(num_prompts=20, min_input=3, max_input=9, min_output=2, max_output=5, seed=1, quick=False)
    requests = bench.make_requests(workload, vocab_size=49152)
    assert requests == bench.make_requests(workload, vocab_size=49152)
    assert all(3 <= len(r.prompt_ids) <= 9 and 2 <= r.max_tokens <= 5 for r in requests)
    assert all(100 <= t < 49152 - 100 for r in requests for t in r.prompt_ids)


def test_hf_batches_keep_arrival_order_unless_sorted(bench):
    requests = [bench.Request([7] * n, 1) for n in (5, 1, 4, 2, 3)]
    assert bench.hf_batches(requests, 2, sort_by_length=False) == [[0, 1], [2, 3], [4]]
    assert bench.hf_batches(requests, 2, sort_by_length=True) == [[1, 3], [4, 2], [0]]
