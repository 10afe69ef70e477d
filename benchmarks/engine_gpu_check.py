"""GPU check of the engine with the plain-torch kernels (the baseline issue 8 improves on).

1. Correctness: a tiny random Llama, float32, greedy, on CUDA vs on CPU: token-exact.
2. Speed: Llama-3-8B shape, random weights, bf16, one GPU: decode step time at batch 1
   (128-token prompt) and at batch 64 (1024-token prompts), against the HBM floor (weight
   bytes / copy bandwidth measured in the same run).

Writes JSON to --out (a folder) and prints a short table. Runs without Ray (not on the GPU
image). Usage: python benchmarks/engine_gpu_check.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from splitserve import LLM, SamplingParams


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t)


def tiny_cpu_vs_cuda() -> dict:
    """Same weights on both devices: a tiny transformers model saved as safetensors (random
    weights drawn by splitserve itself come from the device's RNG, so they differ by device)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from splitserve.workers.model_source import random_config

    prompts = [[5, 6, 7, 8], [9] * 40, list(range(3, 60))]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    outs = {}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(random_config("tiny-llama"), dtype=torch.float32).save_pretrained(folder)
        for device in ("cpu", "cuda"):
            with LLM(folder, device=device, dtype="float32", show_progress=False) as llm:
                outs[device] = [o.token_ids for o in llm.generate(prompts, params)]
    return {"match": outs["cpu"] == outs["cuda"], "cpu": outs["cpu"], "cuda": outs["cuda"]}


def decode_step_ms(llm: LLM, batch: int, prompt_len: int, out_len: int) -> float:
    """Mean wall time of the steps after every prompt is prefilled (pure decode steps)."""
    engine = llm.engine
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", [100 + (i + j) % 1000 for j in range(prompt_len)],
                           SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True))
    times = []
    while engine.has_unfinished_requests():
        decoding = not engine.scheduler.waiting and all(
            s.num_uncomputed_tokens == 1 for s in engine.scheduler.running)
        t = time.perf_counter()
        engine.step()
        if decoding:
            times.append(time.perf_counter() - t)
    return 1000 * sum(times[2:]) / max(1, len(times) - 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "engine_gpu_check", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": "python benchmarks/engine_gpu_check.py"}
    try:
        result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        result["commit"] = None
    result["tiny_cpu_vs_cuda"] = tiny_cpu_vs_cuda()
    bw = copy_bandwidth()
    with LLM("random:llama-3-8b", device="cuda", dtype="bfloat16", kv_cache_memory=24 << 30,
             max_num_seqs=64, show_progress=False) as llm:
        weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.executor_for_tests.runner.model.parameters())
        floor_ms = 1000 * weight_bytes / bw  # weights read once per step (GPU.md's convention)
        b1 = decode_step_ms(llm, 1, 128, 64)
        b64 = decode_step_ms(llm, 64, 1024, 32)
    result |= {"copy_bandwidth_TBps": bw / 1e12, "weight_GB": weight_bytes / 1e9, "hbm_floor_ms_batch1": floor_ms,
               "decode_ms_batch1": b1, "decode_ms_batch64_ctx1k": b64, "kernels": "plain-torch references, no CUDA graphs"}
    (args.out / "engine_gpu_check.json").write_text(json.dumps(result, indent=1))
    print(f"tiny float32 cpu == cuda: {result['tiny_cpu_vs_cuda']['match']}")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; weights {weight_bytes / 1e9:.2f} GB; floor {floor_ms:.2f} ms")
    print(f"decode step: batch 1 {b1:.2f} ms ({b1 / floor_ms:.2f}x floor); batch 64 @1k ctx {b64:.2f} ms")


if __name__ == "__main__":
    main()
