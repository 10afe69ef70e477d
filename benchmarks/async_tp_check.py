"""Async scheduling in a tp-2 group on two GPUs: greedy output against transformers.

With async scheduling and tp > 1 the output rank broadcasts each step's sampled tokens to its
tp peer over NCCL, on the device, and both ranks fill the next step's placeholder rows from
them. This check runs a tiny random Llama (float32, KV heads that split over 2 ranks) as one
tp-2 group, rank r on cuda:r, with async scheduling on and off, and compares both with
transformers `generate()` on the same weights (on cuda:0; the model and its answers come from
`multi_gpu_check.make_model`). Requests stop after different numbers of tokens, so sequences
end while a step is queued ahead of them. The CPU tests run the same code over gloo; this is
the NCCL path.

Usage (two GPUs, NVLink multicast off):
    NCCL_NVLS_ENABLE=0 python benchmarks/async_tp_check.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_meta, beside this script
from multi_gpu_check import MAX_TOKENS, Model, device_summary, make_model  # noqa: E402
from results_meta import multicast_off, report_header  # noqa: E402

#: Tokens asked of each prompt (at most MAX_TOKENS, the oracle's answer length).
LENGTHS = [MAX_TOKENS, 3, 11, 7, MAX_TOKENS, 1, 9, 5]


def run(model: Model, device: str, async_scheduling: bool) -> tuple[list[list[int]], float]:
    from splitserve import LLM, SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in LENGTHS]
    with LLM(str(model.folder), device=device, dtype="float32", tensor_parallel_size=2,
             async_scheduling=async_scheduling, show_progress=False) as llm:
        assert llm.engine.async_scheduling is async_scheduling
        start = time.perf_counter()
        outs = [o.token_ids for o in llm.generate(model.prompts, params)]
        return outs, time.perf_counter() - start


def main() -> None:
    import torch

    multicast_off()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run over gloo")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        sys.exit("needs two GPUs")
    result = report_header("async_tp_check", __file__, sys.argv[1:], datetime.now(timezone.utc),
                           device_summary(args.device))
    with tempfile.TemporaryDirectory() as folder:
        oracle_device = "cuda:0" if args.device == "cuda" else "cpu"
        model = make_model(None, Path(folder), oracle_device, len(LENGTHS), "tiny-llama")
        # greedy: the first n tokens of the oracle's MAX_TOKENS are the answer to max_tokens=n
        expected = [e[:n] for e, n in zip(model.expected, LENGTHS)]
        for mode in (True, False):
            outs, seconds = run(model, args.device, mode)
            key = "async" if mode else "sync"
            result[key] = {"match": outs == expected, "seconds": round(seconds, 3),
                           "mismatched": [i for i, (a, b) in enumerate(zip(outs, expected)) if a != b]}
            print(f"tp 2, {key}: token-exact with transformers: {outs == expected} ({seconds:.2f} s)", flush=True)
    result["layout"] = f"one group, tp 2 ({args.device}), float32, {model.label}, kernels: " \
                       f"{os.environ.get('SPLITSERVE_KERNELS', 'auto')}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "async_tp_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
