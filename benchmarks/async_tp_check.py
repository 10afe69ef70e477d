"""Async scheduling in a tp-2 group on two GPUs: greedy output against transformers.

With async scheduling and tp > 1 the output rank broadcasts each step's sampled tokens to its
tp peer over NCCL, on the device, and both ranks fill the next step's placeholder rows from
them. This check runs a tiny random Llama (float32, KV heads that split over 2 ranks) as one
tp-2 group, rank r on cuda:r, with async scheduling on and off, and compares both with
transformers `generate()` on the same weights (on cuda:0). The CPU tests run the same code
over gloo; this is the NCCL path.

Usage (two GPUs, NVLink multicast off):
    NCCL_NVLS_ENABLE=0 python benchmarks/async_tp_check.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_meta, beside this script
from results_meta import multicast_off, report_header  # noqa: E402

LENGTHS = [(5, 24), (40, 7), (57, 31), (12, 16), (3, 40), (26, 11)]  # (prompt, output) tokens


def oracle(model, prompts: list[list[int]], lengths: list[int], device: str) -> list[list[int]]:
    import torch

    outs = []
    for prompt, n in zip(prompts, lengths):
        ids = torch.tensor([prompt], device=device)
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        outs.append(out[0, len(prompt):].tolist())
    return outs


def run(folder: str, device: str, async_scheduling: bool, prompts, lengths) -> tuple[list[list[int]], float]:
    from splitserve import LLM, SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    with LLM(folder, device=device, dtype="float32", tensor_parallel_size=2, async_scheduling=async_scheduling,
             show_progress=False) as llm:
        assert llm.engine.async_scheduling is async_scheduling
        start = time.perf_counter()
        outs = [o.token_ids for o in llm.generate(prompts, params)]
        return outs, time.perf_counter() - start


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from splitserve.workers.model_source import random_config

    multicast_off()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run over gloo")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        sys.exit("needs two GPUs")
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 200, (p,), generator=gen).tolist() for p, _ in LENGTHS]
    lengths = [n for _, n in LENGTHS]
    device = {"type": args.device, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
              "name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"}
    result = report_header("async_tp_check", __file__, sys.argv[1:], datetime.now(timezone.utc), device)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(random_config("tiny-llama"), dtype=torch.float32)
        model.save_pretrained(folder)
        first = "cuda:0" if args.device == "cuda" else "cpu"
        expected = oracle(model.to(first).eval(), prompts, lengths, first)
        del model
        for mode in (True, False):
            outs, seconds = run(folder, args.device, mode, prompts, lengths)
            key = "async" if mode else "sync"
            result[key] = {"match": outs == expected, "seconds": round(seconds, 3),
                           "mismatched": [i for i, (a, b) in enumerate(zip(outs, expected)) if a != b]}
            print(f"tp 2, {key}: token-exact with transformers: {outs == expected} ({seconds:.2f} s)", flush=True)
    result["layout"] = f"one group, tp 2 ({args.device}), float32, tiny-llama random weights, kernels: " \
                       f"{os.environ.get('SPLITSERVE_KERNELS', 'auto')}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "async_tp_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
