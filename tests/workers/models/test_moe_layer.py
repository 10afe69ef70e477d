"""The MoE layer (workers/models/moe.py) and the MoE families' loaders, in one process.

The ranks of a tp-2 group are built side by side with no communicator (their all-reduce is a
no-op), so each returns its partial sum: with experts sharded (every expert's slice) and with
expert parallelism (whole experts) the partial sums add up to the one-rank layer. The greedy
token-exact checks against transformers, across processes, are in tests/workers/test_llm.py,
test_worker_group.py and test_disagg_engine.py. (Not test_moe.py: tests/kernels has one.)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from splitserve.mapping import Mapping
from splitserve.workers.config import ModelConfig
from splitserve.workers.model_source import random_config
from splitserve.workers.models.llama import LlamaMLP, random_hf_weights
from splitserve.workers.models.moe import SparseMoeBlock
from splitserve.workers.models.registry import build_model
from splitserve.workers.parallel import ParallelState


def _model(name: str, tp: int = 1, rank: int = 0, expert_parallel: bool = False, weights=None):
    cfg = ModelConfig.from_hf(random_config(name))
    parallel = ParallelState(Mapping(tp, rank, tp, 1), None, expert_parallel)
    model = build_model(cfg, parallel, torch.device("cpu"), torch.float32)
    model.load_weights(weights if weights is not None else random_hf_weights(cfg, seed=3))
    return model


def test_sparse_and_dense_layers_follow_the_config():
    model = _model("tiny-qwen3-moe")  # mlp_only_layers=[1]
    assert [type(layer.mlp) for layer in model.layers] == [SparseMoeBlock, LlamaMLP, SparseMoeBlock]
    assert hasattr(model.layers[0].self_attn, "q_norm")
    cfg = dataclasses.replace(model.cfg, decoder_sparse_step=2, mlp_only_layers=())
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert not any(hasattr(layer.self_attn, "q_norm") for layer in _model("tiny-mixtral").layers)


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_tp2_ranks_partial_sums_add_up_to_the_one_rank_layer(expert_parallel):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = _model("tiny-qwen3-moe").layers[0].mlp(x)
        ranks = [_model("tiny-qwen3-moe", 2, r, expert_parallel).layers[0].mlp for r in range(2)]
        parts = [block(x) for block in ranks]
    for r, block in enumerate(ranks):
        experts = block.experts
        if expert_parallel:  # whole experts: 4 of the 8 each, full width
            assert experts.experts == range(4 * r, 4 * r + 4) and tuple(experts.w13.shape) == (4, 64, 64)
        else:  # every expert, half its width
            assert experts.experts == range(8) and tuple(experts.w13.shape) == (8, 32, 64)
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(parts[0], whole)  # each rank really holds only a part


def test_mixtral_checkpoint_names_load_like_qwen3_moe_names():
    cfg = ModelConfig.from_hf(random_config("tiny-mixtral"))
    assert cfg.norm_topk_prob and cfg.moe_intermediate_size == cfg.intermediate_size == 32
    renamed = {".mlp.gate.": ".block_sparse_moe.gate.", ".gate_proj.": ".w1.", ".up_proj.": ".w3.",
               ".down_proj.": ".w2.", ".mlp.experts.": ".block_sparse_moe.experts."}

    def mixtral_names():
        for name, tensor in random_hf_weights(cfg, seed=3):
            for ours, theirs in renamed.items():
                name = name.replace(ours, theirs)
            yield name, tensor

    assert any("block_sparse_moe.experts.7.w2" in n for n, _ in mixtral_names())
    a, b = _model("tiny-mixtral"), _model("tiny-mixtral", weights=mixtral_names())
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_a_missing_expert_is_named_and_expert_parallel_needs_divisible_experts():
    cfg = ModelConfig.from_hf(random_config("tiny-qwen3-moe"))
    partial = ((n, t) for n, t in random_hf_weights(cfg, 3) if "layers.2.mlp.experts.5.up_proj" not in n)
    with pytest.raises(ValueError, match="missing 1 tensors"):
        _model("tiny-qwen3-moe", weights=partial)
    # Rank 1 of an expert-parallel tp-2 group does not need rank 0's experts.
    theirs = ((n, t) for n, t in random_hf_weights(cfg, 3)
              if not any(f"experts.{e}." in n for e in range(4)))
    _model("tiny-qwen3-moe", 2, 1, expert_parallel=True, weights=theirs)
    with pytest.raises(ValueError, match="8 experts do not divide over tp 3"):
        cfg3 = dataclasses.replace(cfg, num_heads=6, num_kv_heads=3, head_dim=16)
        build_model(cfg3, ParallelState(Mapping(3, 0, 3, 1), None, True), torch.device("cpu"), torch.float32)


def test_sharded_safetensors_folder_loads_like_one_file(tmp_path):
    from transformers import AutoModelForCausalLM

    from splitserve.workers.weights import iter_safetensors

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(random_config("tiny-qwen3-moe"), dtype=torch.float32)
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    one = _model("tiny-qwen3-moe", weights=iter_safetensors(tmp_path / "one", progress=False))
    sharded = _model("tiny-qwen3-moe", weights=iter_safetensors(tmp_path / "sharded", progress=False))
    for (name, a), (_, b) in zip(one.named_parameters(), sharded.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    # The router and an expert really came from the checkpoint (transformers' names).
    layer = hf.model.layers[2].mlp
    assert torch.equal(one.layers[2].mlp.gate.weight, layer.gate.weight)
    assert torch.equal(one.layers[2].mlp.experts.w2[5], layer.experts.down_proj[5])
