"""Where a decode step's time goes on a GPU: kernels (their device time, and how many)
against the step's wall time, with CUDA graphs and eager.

A step within a small factor of its bytes-read floor spends its time streaming weights; one
far above it spends it between kernels (launch gaps, small kernels with a fixed cost). This
script tells the two apart: it runs a few pure decode steps of ``--model`` at batch 1 under
`torch.profiler` (eager, so every kernel is seen), sums the device time of the kernels per
step, counts them, lists the costliest, and times the graph-replayed step beside it.

Usage (repository root, package on PYTHONPATH, one GPU):
    python benchmarks/decode_profile.py --model random:qwen3-30b-a3b --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_perf  # noqa: E402
import results_meta  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:qwen3-30b-a3b")
    p.add_argument("--kv-gb", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    p.add_argument("--context", type=int, default=128, help="prompt tokens of each sequence")
    p.add_argument("--quantization", default=None, help="fp8: FP8 weights")
    p.add_argument("--kv-cache-dtype", default="auto", help="fp8: an FP8 KV cache")
    p.add_argument("--out", type=Path, default=results_meta.RESULTS_DIR)
    args = p.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from splitserve import LLM, SamplingParams

    now = datetime.now(timezone.utc)
    report = results_meta.report_header("decode_profile", __file__, sys.argv[1:] if argv is None else argv, now,
                                        {"name": torch.cuda.get_device_name() if torch.cuda.is_available()
                                         else results_meta.cpu_model(), "torch": torch.__version__})
    llm = LLM(args.model, kv_cache_memory=args.kv_gb << 30, max_num_seqs=max(8, args.batch),
              show_progress=False, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    engine, runner = llm.engine, llm.engine.executor_for_tests.runner
    vocab = runner.model_cfg.vocab_size
    report["graph_step_ms"] = 1e3 * gpu_perf.decode_step_s(llm, args.batch, args.context, 24, seed=1, vocab=vocab)
    runner.enforce_eager = True
    report["eager_step_ms"] = 1e3 * gpu_perf.decode_step_s(llm, args.batch, args.context, 24, seed=2, vocab=vocab)
    for i, prompt in enumerate(gpu_perf._distinct_prompts(args.batch, args.context, vocab, 3)):
        engine.add_request(f"prof{i}", prompt,
                           SamplingParams(max_tokens=args.steps + 64, temperature=0.0, ignore_eos=True))
    budget = llm.engine.config.scheduler.max_num_batched_tokens
    for _ in range(-(-args.batch * args.context // budget) + 3):  # prefills, first decodes: untraced
        engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / args.steps
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    device_us = sum(e.device_time for e in kernels) / args.steps
    by_name = Counter()
    counts = Counter()
    for e in kernels:
        by_name[e.name[:90]] += e.device_time / args.steps
        counts[e.name[:90]] += 1 / args.steps
    report |= {"model": args.model, "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype,
               "batch": args.batch, "context": args.context, "profiled_eager_step_ms": 1e3 * wall, "kernel_device_ms_per_step": device_us / 1e3,
               "kernels_per_step": len(kernels) / args.steps,
               "top_kernels": [{"name": n, "us_per_step": round(us, 1), "count_per_step": round(counts[n], 1)}
                               for n, us in by_name.most_common(25)]}
    llm.shutdown()
    quant = f"_{args.quantization}" if args.quantization else ""
    out = args.out / (f"decode_profile_{results_meta.slug(report['device']['name'])}{quant}_b{args.batch}"
                      f"_{now:%Y-%m-%dT%H%M}.json")
    results_meta.write_json(out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "top_kernels"}, indent=1))
    for k in report["top_kernels"]:
        print(f"{k['us_per_step']:9.1f} us  x{k['count_per_step']:6.1f}  {k['name']}")
    return report


if __name__ == "__main__":
    main()
