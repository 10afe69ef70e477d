"""benchmarks/kv_transfer.py in a quick configuration: two processes, gloo, a small KV shape.

The script spawns its two processes, which import it by module name, so the test loads it
as ``kv_transfer`` (the file's stem).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kv_transfer.py"


@pytest.fixture(scope="module")
def bench():
    """The benchmark script as a module (it is a script, not part of the installed package)."""
    path_before = list(sys.path)  # main() puts benchmarks/ on it for the spawned processes
    spec = importlib.util.spec_from_file_location("kv_transfer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    sys.path[:] = path_before


def test_quick_run_reports_service_and_raw(bench, tmp_path: Path):
    out = tmp_path / "x.json"
    argv = ["--model", "smollm2-135m", "--prompt-tokens", "64", "--repeats", "2", "--device", "cpu",
            "--dtype", "float32", "--num-threads", "1", "--timeout-s", "20", "--run-timeout-s", "60",
            "--out", str(out), "--profile"]
    report = bench.main(argv)

    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["device"]["backend"] == "gloo"
    assert saved["parameters"]["model"] == "smollm2-135m" and saved["parameters"]["dtype"] == "float32"
    (row,) = saved["results"]
    assert row["prompt_tokens"] == 64 and row["num_blocks"] == 4
    assert row["num_bytes"] == 30 * 2 * 4 * 16 * 3 * 64 * 4  # layers x K,V x blocks x 16 tokens x heads x dim x 4 B
    assert row["service_gb_per_s"] > 0 and row["raw_gb_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["service_gb_per_s"] / row["raw_gb_per_s"], rel=1e-2)
    assert isinstance(row["target_met"], bool) and row["target_ratio"] == bench.TARGET_RATIO
    assert len(row["service_seconds"]) == 2 and len(row["raw_seconds"]) == 2
    assert row["verified"] and row["service_bytes_match"] and saved["all_verified"]
    assert saved["target"]["ratio"] is None  # no 2048-token prompt in this run
    assert saved["command"] and saved["date"] and "git_commit" in saved
    assert out.with_suffix(".png").stat().st_size > 0
    # --profile: one more transfer, profiled; both sides' timelines show the pack/send and recv/unpack
    profiled = row["profiled"]
    assert profiled["seconds"] > 0
    sender = {e["name"] for e in profiled["sender_timeline"]}
    receiver = {e["name"] for e in profiled["receiver_timeline"]}
    assert {"kv_bench:layer_hooks", "aten::index_select", "gloo:send"} <= sender
    assert {"kv_bench:barrier", "aten::index_copy_", "gloo:recv"} <= receiver
    traces = {p.name for p in Path(saved["traces"]).iterdir()}
    assert traces == {"prefill-p64.trace.json", "decode-p64.trace.json"}


def test_block_ids_are_scattered_and_seeded(bench):
    cases = bench.make_cases([64, 300], block_size=16, cache_blocks=40, seed=3)
    assert cases == bench.make_cases([64, 300], block_size=16, cache_blocks=40, seed=3)
    assert [c.num_blocks for c in cases] == [4, 19]
    for c in cases:
        for ids in (c.src_block_ids, c.dst_block_ids):
            assert len(set(ids)) == len(ids) and all(0 <= i < 40 for i in ids)
    assert cases[1].src_block_ids != sorted(cases[1].src_block_ids)
    assert bench.default_cache_blocks([2048], 16) == 193


def test_cuda_needs_two_gpus(bench, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match="needs 2 GPUs"):
        bench.main(["--device", "cuda", "--out", "/nonexistent/x.json"])
