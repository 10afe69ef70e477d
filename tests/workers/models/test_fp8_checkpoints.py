"""FP8 weights end to end (workers/quant_config.py, workers/models/quant.py, the loader): tiny
Llama-family models written by the test in each published checkpoint format, loaded by the
engine, against references built from the same e4m3 values.

Formats: compressed-tensors float-quantized per tensor and per channel, ``quant_method: fp8``
with 128x128 ``weight_scale_inv`` blocks (a 256-wide model, so blocks are whole and a tp-2
slice keeps them whole), and a float checkpoint with ``quantization="fp8"``.

- The loader: every rank's dequantized projections (fused q|k|v and gate|up, per-tensor scales
  expanded per part, tp slices) equal the checkpoint's dequantized tensors, exactly.
- The engine: greedy tokens equal transformers' on the dequantized weights with each
  projection's input quantized per token (per 128-group for blocks) as `fp8_linear_ref` does,
  and their logprobs are ten times nearer that than the plain dequantized float32 model's.
- tp 2 of a quantized checkpoint gives the tokens of tp 1 (rank processes over gloo).
- Refusals: block scales split by a tp slice, e4m3 tensors into an unquantized module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from prompt_helpers import random_prompts
from safetensors.torch import save_file

from splitserve import LLM, SamplingParams
from splitserve.kernels.fp8 import (
    Fp8Scheme, dequantize_per_token_group, quantize, quantize_per_token, quantize_per_token_group,
)
from splitserve.mapping import Mapping
from splitserve.workers.config import ModelConfig
from splitserve.workers.model_source import random_config
from splitserve.workers.models.llama import random_hf_weights
from splitserve.workers.models.registry import build_model
from splitserve.workers.parallel import ParallelState
from splitserve.workers.quant_config import resolve_quantization
from splitserve.workers.weights import iter_safetensors

MAX_TOKENS = 8
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_CT_GROUP = {"targets": ["Linear"], "input_activations": {"type": "float", "num_bits": 8, "strategy": "token",
                                                          "dynamic": True, "symmetric": True}}


def _compressed_tensors(strategy: str, ignore: tuple[str, ...] = ("lm_head",)) -> dict:
    weights = {"type": "float", "num_bits": 8, "strategy": strategy, "symmetric": True, "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": list(ignore),
            "config_groups": {"group_0": {**_CT_GROUP, "weights": weights}}}


_FP8_BLOCK = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}

#: name -> (model shape, scheme, checkpoint scale name, quantization_config or None: float + quantization="fp8")
FORMATS = {
    "ct-tensor": ("tiny-llama", Fp8Scheme.TENSOR, "weight_scale", _compressed_tensors("tensor")),
    "ct-channel": ("tiny-qwen2", Fp8Scheme.CHANNEL, "weight_scale", _compressed_tensors("channel")),
    "fp8-block": ("wide-llama", Fp8Scheme.BLOCK, "weight_scale_inv", _FP8_BLOCK),
    # Older quant_method fp8 releases: one 0-d weight_scale per tensor, plus static-looking
    # input_scale tensors that dynamic activations never read.
    "fp8-tensor": ("tiny-qwen3", Fp8Scheme.TENSOR, "weight_scale", {"quant_method": "fp8",
                                                                     "activation_scheme": "dynamic"}),
    "float+fp8": ("tiny-llama", Fp8Scheme.CHANNEL, None, None),
    # Experts stored FP8 too (and held FP8), the router left alone as published ones do.
    "ct-channel-moe": ("tiny-qwen3-moe", Fp8Scheme.CHANNEL, "weight_scale",
                       _compressed_tensors("channel", ("lm_head", "re:.*mlp.gate$"))),
    # Qwen3-MoE-FP8's format: 128x128 blocks (two per expert part: a tp-2 slice is one).
    "fp8-block-moe": ("wide-qwen3-moe", Fp8Scheme.BLOCK, "weight_scale_inv", _FP8_BLOCK),
    "float+fp8-moe": ("tiny-qwen3-moe", Fp8Scheme.CHANNEL, None, None),
    # Written under Mixtral's hub names (block_sparse_moe.experts.{e}.w1 ...; `MIXTRAL_NAMES`).
    "ct-tensor-mixtral": ("tiny-mixtral", Fp8Scheme.TENSOR, "weight_scale",
                          _compressed_tensors("tensor", ("lm_head", "re:.*block_sparse_moe.gate$"))),
}
#: random_hf_weights' (Qwen3-MoE) names -> Mixtral's, as its checkpoints on the hub spell them.
MIXTRAL_NAMES = {".mlp.gate.": ".block_sparse_moe.gate.", ".mlp.experts.": ".block_sparse_moe.experts.",
                 ".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}
MOE_FORMATS = [f for f in FORMATS if f.endswith(("moe", "mixtral"))]
DENSE_FORMATS = [f for f in FORMATS if f not in MOE_FORMATS]


def _hf_config(shape: str):
    if shape == "wide-qwen3-moe":  # q, k, v, o, the dense MLP: whole 128-row blocks on each of up to 4 ranks
        config = random_config("tiny-qwen3-moe")
        for key, value in dict(hidden_size=256, num_hidden_layers=2, head_dim=64, num_attention_heads=8,
                               num_key_value_heads=8, intermediate_size=512, moe_intermediate_size=256).items():
            setattr(config, key, value)
        return config
    if shape != "wide-llama":
        return random_config(shape)
    # Every projection a whole number of 128x128 blocks, on one rank and on each of two.
    return random_config("tiny-llama").__class__(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=512,
        vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        architectures=["LlamaForCausalLM"])


class Fp8Checkpoint:
    """One format's folders: ``quantized`` (what the engine loads) and ``dequantized`` (float32
    safetensors of the same e4m3 values: the oracle's weights)."""

    def __init__(self, root: Path, fmt: str):
        shape, self.scheme, scale_name, qconfig = FORMATS[fmt]
        self.hf_config = _hf_config(shape)
        self.cfg = ModelConfig.from_hf(self.hf_config)
        self.quantized, self.dequantized = root / fmt, root / f"{fmt}-dequantized"
        self.quantization = None if qconfig else "fp8"
        weights = dict(random_hf_weights(self.cfg, seed=7))
        stored, dequantized = {}, {}
        for name, w in weights.items():
            if not name.endswith(tuple(f"{p}.weight" for p in PROJECTIONS)):
                stored[name] = dequantized[name] = w
                continue
            q = quantize(w, self.scheme)
            dequantized[name] = q.dequantize()
            if qconfig is None:
                stored[name] = w  # the engine quantizes it at load, as `quantize` just did
            else:
                stored[name] = q.data
                scalar = qconfig["quant_method"] == "fp8" and self.scheme is Fp8Scheme.TENSOR
                stored[name.removesuffix("weight") + scale_name] = q.scale.reshape(()) if scalar else q.scale
                if scalar:
                    stored[name.removesuffix("weight") + "input_scale"] = torch.tensor(1.0)
        self.dequantized_weights = dequantized
        self.float_weights = weights
        self.renames = MIXTRAL_NAMES if shape == "tiny-mixtral" else {}
        self._write(self.quantized, stored, qconfig)
        self._write(self.dequantized, dequantized, None)

    def _write(self, folder: Path, tensors: dict, qconfig: dict | None) -> None:
        self.hf_config.save_pretrained(folder)
        if qconfig is not None:
            config = json.loads((folder / "config.json").read_text())
            config["quantization_config"] = qconfig
            (folder / "config.json").write_text(json.dumps(config))
        save_file({self._rename(k): v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))

    def _rename(self, name: str) -> str:
        for old, new in self.renames.items():  # (Mixtral has no dense MLP these could also name)
            name = name.replace(old, new)
        return name


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    made: dict[str, Fp8Checkpoint] = {}

    def get(fmt: str) -> Fp8Checkpoint:
        if fmt not in made:
            made[fmt] = Fp8Checkpoint(root, fmt)
        return made[fmt]

    return get


# ---- the loader, rank by rank, in this process ------------------------------------------------------


def _rank_model(ckpt: Fp8Checkpoint, tp: int, rank: int, expert_parallel: bool = False):
    from transformers import AutoConfig

    quant = resolve_quantization(ckpt.quantization, AutoConfig.from_pretrained(ckpt.quantized))
    parallel = ParallelState(Mapping(tp, rank, tp, 1), None, expert_parallel)  # no communicator: not run here
    model = build_model(ckpt.cfg, parallel, torch.device("cpu"), torch.float32, quant)
    model.load_weights(iter_safetensors(ckpt.quantized, progress=False))
    return model


@pytest.mark.parametrize("fmt", DENSE_FORMATS)
@pytest.mark.parametrize("tp", [1, 2])
def test_each_rank_holds_the_checkpoints_dequantized_slices(checkpoints, fmt, tp):
    ckpt = checkpoints(fmt)
    deq, d = ckpt.dequantized_weights, ckpt.cfg.head_dim
    for rank in range(tp):
        model = _rank_model(ckpt, tp, rank)
        m = model.parallel.mapping
        heads, kv = m.heads(ckpt.cfg.num_heads), m.kv_heads(ckpt.cfg.num_kv_heads)
        q_rows, kv_rows = slice(heads.start * d, heads.stop * d), slice(kv.start * d, kv.stop * d)
        cols = m.shard_range(ckpt.cfg.intermediate_size)
        mlp_cols = slice(cols.start, cols.stop)
        assert model.embed_tokens.weight.dtype == getattr(model, "lm_head", model.embed_tokens).weight.dtype == torch.float32
        for i, layer in enumerate(model.layers):
            def w(p):
                return deq[f"model.layers.{i}.{p}.weight"]
            attn, mlp = layer.self_attn, layer.mlp
            assert attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
            scheme = Fp8Scheme.BLOCK if ckpt.scheme is Fp8Scheme.BLOCK else Fp8Scheme.CHANNEL
            assert attn.qkv_proj.quant.weight(attn.qkv_proj).scheme is scheme
            def cols_of(p, c):
                if ckpt.quantization is None:
                    return w(p)[:, c]
                # Quantized at load: a row-parallel rank scales the rows of its own columns.
                return quantize(ckpt.float_weights[f"model.layers.{i}.{p}.weight"][:, c], ckpt.scheme).dequantize()
            want = {
                attn.qkv_proj: torch.cat([w("self_attn.q_proj")[q_rows], w("self_attn.k_proj")[kv_rows],
                                          w("self_attn.v_proj")[kv_rows]]),
                attn.o_proj: cols_of("self_attn.o_proj", q_rows),
                mlp.gate_up_proj: torch.cat([w("mlp.gate_proj")[mlp_cols], w("mlp.up_proj")[mlp_cols]]),
                mlp.down_proj: cols_of("mlp.down_proj", mlp_cols),
            }
            for linear, expected in want.items():
                assert torch.equal(linear.quant.weight(linear).dequantize(), expected), (fmt, tp, rank, i)


@pytest.mark.parametrize("fmt,tp,expert_parallel", [
    ("ct-channel-moe", 1, False), ("ct-channel-moe", 2, False), ("ct-channel-moe", 2, True),
    ("fp8-block-moe", 1, False), ("fp8-block-moe", 2, False), ("fp8-block-moe", 2, True), ("float+fp8-moe", 2, False),
    ("ct-tensor-mixtral", 1, False)])
def test_fp8_experts_load_as_e4m3_with_their_scales_and_the_router_stays_float(checkpoints, fmt, tp, expert_parallel):
    """Each rank's experts, dequantized, equal the checkpoint's dequantized slices (quantized at
    load: each rank's down columns scaled on their own, as a row-parallel linear's are)."""
    ckpt = checkpoints(fmt)
    deq, inter = ckpt.dequantized_weights, ckpt.cfg.moe_intermediate_size
    for rank in range(tp):
        model = _rank_model(ckpt, tp, rank, expert_parallel)
        block = model.layers[0].mlp  # sparse; tiny-qwen3-moe's layer 1 is dense (mlp_only_layers)
        assert block.gate.weight.dtype == torch.float32
        assert block.experts.w13.dtype == block.experts.w2.dtype == torch.float8_e4m3fn
        experts = block.experts.weights()
        assert experts.scheme is (Fp8Scheme.BLOCK if ckpt.scheme is Fp8Scheme.BLOCK else Fp8Scheme.CHANNEL)
        cols, owned = block.experts.cols, block.experts.experts
        for local, e in enumerate(owned):
            def w(p, table=deq):
                return table[f"model.layers.0.mlp.experts.{e}.{p}.weight"]
            want13 = torch.cat([w("gate_proj")[cols.start:cols.stop], w("up_proj")[cols.start:cols.stop]])
            want2 = w("down_proj")[:, cols.start:cols.stop]
            if ckpt.quantization is not None:
                want2 = quantize(w("down_proj", ckpt.float_weights)[:, cols.start:cols.stop], ckpt.scheme).dequantize()
            w13, w2 = experts.expert(local, torch.float32)
            assert torch.equal(w13, want13), (fmt, rank, e)
            assert torch.equal(w2, want2), (fmt, rank, e)
        assert len(cols) * len(owned) == inter * ckpt.cfg.num_experts // tp


def test_fp8_block_experts_refuse_a_tp_slice_inside_a_block(checkpoints):
    """256-wide experts over tp 4: 64 each, half a block (tp 2 and expert parallel, which keeps
    experts whole, load: above)."""
    from transformers import AutoConfig

    ckpt = checkpoints("fp8-block-moe")
    quant = resolve_quantization(None, AutoConfig.from_pretrained(ckpt.quantized))
    with pytest.raises(ValueError, match="experts' intermediate dimension to start on a multiple of 128"):
        build_model(ckpt.cfg, ParallelState(Mapping(4, 1, 4, 1), None, False), torch.device("cpu"),
                    torch.float32, quant)


def test_per_tensor_scales_of_fused_parts_stay_apart(checkpoints):
    qkv = _rank_model(checkpoints("ct-tensor"), 1, 0).layers[0].self_attn.qkv_proj
    q, kv = qkv.shards[0].size, qkv.shards[1].size
    scales = qkv.weight_scale.squeeze(1)
    parts = [scales[:q], scales[q:q + kv], scales[q + kv:]]
    assert all(torch.all(p == p[0]) for p in parts)  # one scale per part, repeated per row
    assert len({p[0].item() for p in parts}) == 3


def test_a_tp_slice_that_would_split_a_scale_block_is_refused(checkpoints):
    from transformers import AutoConfig

    ckpt = checkpoints("fp8-block")
    quant = resolve_quantization(None, AutoConfig.from_pretrained(ckpt.quantized))
    # tp 4: 64 query rows per rank, half a block.
    with pytest.raises(ValueError, match="multiple of 128 rows"):
        build_model(ckpt.cfg, ParallelState(Mapping(4, 1, 4, 1), None, False), torch.device("cpu"),
                    torch.float32, quant)


def test_fp8_tensors_without_a_quantization_config_are_refused(checkpoints, tmp_path):
    ckpt = checkpoints("ct-channel")
    model = build_model(ckpt.cfg, ParallelState(Mapping(1, 0, 1, 1), None, False), torch.device("cpu"),
                        torch.float32, None)
    with pytest.raises(ValueError, match="is FP8 but the module it loads into is not quantized"):
        model.load_weights(iter_safetensors(ckpt.quantized, progress=False))


# ---- the engine against transformers on the same e4m3 values --------------------------------------------


def _oracle(ckpt: Fp8Checkpoint, fake_quant: bool):
    """transformers on the dequantized weights; with ``fake_quant`` every projection's input is
    quantized and dequantized first, per token (per 128-group for blocks): fp8_linear_ref's math."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt.dequantized, dtype=torch.float32).eval()
    if fake_quant:
        def hook(module, args):
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            if ckpt.scheme is Fp8Scheme.BLOCK:
                flat = dequantize_per_token_group(*quantize_per_token_group(flat))
            else:
                q, s = quantize_per_token(flat)
                flat = q.float() * s
            return (flat.reshape(x.shape),)

        for name, module in model.named_modules():
            # MoE experts are weight-only: their activations are not quantized.
            if name.endswith(PROJECTIONS) and isinstance(module, torch.nn.Linear) and ".experts." not in name:
                module.register_forward_pre_hook(hook)
    return model


def _greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            token = int(logits.argmax())
            logprobs.append(torch.log_softmax(logits, -1)[token].item())
            ids.append(token)
    return ids[len(prompt):], logprobs


PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_engine_matches_transformers_on_the_same_fp8_values(checkpoints, fmt):
    ckpt = checkpoints(fmt)
    prompts = random_prompts(ckpt.cfg.vocab_size, [5, 17])
    with LLM(str(ckpt.quantized), quantization=ckpt.quantization, show_progress=False, block_size=4) as llm:
        outs = llm.generate(prompts, PARAMS)
    fake, plain = _oracle(ckpt, fake_quant=True), _oracle(ckpt, fake_quant=False)
    for prompt, out in zip(prompts, outs, strict=True):
        tokens, logprobs = _greedy(fake, prompt, MAX_TOKENS)
        assert out.token_ids == tokens
        ours, fp8_ref = torch.tensor([lp.logprob for lp in out.logprobs]), torch.tensor(logprobs)
        plain_lp = torch.log_softmax(plain(torch.tensor([prompt + out.token_ids])).logits[0].float(), -1)
        float_ref = plain_lp[len(prompt) - 1:-1].gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
        # Float32 sums in another order can tip an activation over an e4m3 rounding boundary
        # (one step, 1/16 of one element), so not bit-exact: ten times nearer the fp8 reference
        # than the float32 model is, which is only the activations' rounding away.
        fp8_gap = (fp8_ref - float_ref).abs().max().item()
        assert 0 < fp8_gap < 0.15
        assert (ours - fp8_ref).abs().max().item() <= 0.1 * fp8_gap


def test_tp2_of_a_quantized_checkpoint_gives_the_tokens_of_tp1(checkpoints):
    ckpt = checkpoints("ct-channel")
    prompts = random_prompts(ckpt.cfg.vocab_size, [6, 30])
    runs = []
    for tp in (1, 2):
        with LLM(str(ckpt.quantized), tensor_parallel_size=tp, show_progress=False, block_size=4) as llm:
            runs.append([o.token_ids for o in llm.generate(prompts, PARAMS)])
    assert runs[0] == runs[1]


def test_fp8_experts_expert_parallel_gives_the_tokens_of_sharded_experts(checkpoints):
    """tp 2 rank processes over gloo, FP8 experts whole per rank (expert parallel) or sliced on
    every rank: the same tokens and logprobs. (Against tp 1 a W8A8 row-parallel linear rounds
    each rank's half of its input on its own per-token scale, a few 1e-3 of a logprob here,
    enough to swap near-ties of this random model.)"""
    ckpt = checkpoints("ct-channel-moe")
    prompts = random_prompts(ckpt.cfg.vocab_size, [6, 30])
    runs = []
    for expert_parallel in (False, True):
        with LLM(str(ckpt.quantized), tensor_parallel_size=2, expert_parallel=expert_parallel, show_progress=False,
                 block_size=4) as llm:
            runs.append(llm.generate(prompts, PARAMS))
    for sharded, whole in zip(*runs, strict=True):
        assert sharded.token_ids == whole.token_ids
        lp = [torch.tensor([lp.logprob for lp in out.logprobs]) for out in (sharded, whole)]
        torch.testing.assert_close(lp[0], lp[1], atol=1e-4, rtol=0)
