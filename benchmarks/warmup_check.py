"""Kernel compiles while serving: the start-up warm-up against none, on one seeded workload.

Triton compiles a kernel variant the first time a launch needs it (about a second on an H200),
and mid-serving that stalls every request of the step. `ModelRunner.warm_up` runs one forward
per step size of `dispatch.warm_up_token_counts` at start-up, so that none is left for the
first requests. Each mode runs in a fresh process with an empty Triton cache:

- ``warm``: as shipped;
- ``cold``: the warm-up's forwards skipped (attention's warm-up and the decode CUDA graphs,
  which were there before, kept).

Per mode: the engine's start-up time and the compiles in it; then a seeded workload of waves
(1 to 4 prompts of random lengths, log-uniform from 1 to ``--max-prompt`` tokens, random ids,
``--max-tokens`` greedy tokens each, ignore_eos; prompts longer than the step budget are chunked,
so steps take many sizes): each wave's wall time and the compiles during it (Triton's
``jit_post_compile_hook``), with the kernels' names. The greedy tokens of the two modes must be
the same (the warm-up leaves nothing behind in the cache).

Usage (repository root, package on PYTHONPATH, one GPU):
    python benchmarks/warmup_check.py --model qwen3-30b-a3b --layers 4 --quantization fp8 --out DIR
Writes ``warmup_check_<device>_<date>.json`` and its ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_meta  # noqa: E402

MODES = ("cold", "warm")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen3-30b-a3b", help="a random: shape name")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (the kernels' variants do not depend on it)")
    p.add_argument("--quantization", default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--waves", type=int, default=24)
    p.add_argument("--max-prompt", type=int, default=3000)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-gb", type=float, default=8.0)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--out", type=Path, default=None, help="folder (or .json path) for the result")
    p.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def workload(seed: int, waves: int, max_prompt: int, vocab: int) -> list[list[list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(waves):
        lengths = [max(1, round(math.exp(rng.uniform(0, math.log(max_prompt))))) for _ in range(rng.randint(1, 4))]
        out.append([[rng.randrange(100, vocab - 1) for _ in range(n)] for n in lengths])
    return out


def run_child(args: argparse.Namespace) -> None:
    """One mode, in this (fresh) process: start the engine, run the workload, write the record."""
    import torch
    import triton

    from splitserve import LLM, SamplingParams
    from splitserve.kernels import dispatch
    from splitserve.workers.model_source import random_config

    compiles: list[str] = []

    def on_compile(*_args, **kwargs):
        compiles.append(str(kwargs.get("repr", "?")).split("[", 1)[0])
        return None
    if not hasattr(triton, "knobs"):
        raise SystemExit(f"triton {triton.__version__} has no knobs.runtime.jit_post_compile_hook")
    triton.knobs.runtime.jit_post_compile_hook = on_compile
    if args.child == "cold":
        dispatch.warm_up_token_counts = lambda *a, **k: []  # the forwards skipped; attention's kept

    cfg = random_config(args.model)
    cfg.num_hidden_layers = args.layers
    folder = Path(tempfile.mkdtemp(prefix="warmup_check_"))
    cfg.save_pretrained(folder)
    t0 = time.perf_counter()
    llm = LLM(f"random:{folder}", quantization=args.quantization, max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory=int(args.kv_gb * 1024**3), show_progress=False, seed=args.seed)
    startup_s, startup_compiles = time.perf_counter() - t0, len(compiles)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # CPU: a smoke run
    waves = []
    for prompts in workload(args.seed, args.waves, args.max_prompt, cfg.vocab_size):
        before = len(compiles)
        sync()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        sync()
        waves.append({"prompt_lens": [len(p) for p in prompts], "seconds": time.perf_counter() - t,
                      "compiles": len(compiles) - before, "kernels": sorted(set(compiles[before:])),
                      "tokens": [list(o.token_ids) for o in outs]})
    llm.shutdown()
    args.child_out.write_text(json.dumps({"startup_s": startup_s, "startup_compiles": startup_compiles,
                                          "waves": waves}))


def summarize(record: dict) -> dict:
    secs = [w["seconds"] for w in record["waves"]]
    return {"startup_s": round(record["startup_s"], 2), "startup_compiles": record["startup_compiles"],
            "workload_s": round(sum(secs), 3), "workload_compiles": sum(w["compiles"] for w in record["waves"]),
            "waves_with_compiles": sum(1 for w in record["waves"] if w["compiles"]),
            "max_wave_s": round(max(secs), 3), "median_wave_s": round(statistics.median(secs), 3),
            "kernels_compiled_in_workload": sorted({k for w in record["waves"] for k in w["kernels"]})}


def plot(path: Path, report: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for mode, rec in report["modes"].items():
        secs = [w["seconds"] for w in rec["waves"]]
        ax.plot(range(len(secs)), secs, marker="o", label=f"{mode}: {rec['summary']['workload_compiles']} compiles")
        hot = [i for i, w in enumerate(rec["waves"]) if w["compiles"]]
        ax.scatter(hot, [secs[i] for i in hot], s=80, facecolors="none", edgecolors="red")
    ax.set_yscale("log")
    ax.set_xlabel("wave (seeded prompts; red rings: Triton compiled during the wave)")
    ax.set_ylabel("wall time (s)")
    ax.legend()
    results_meta.finish_figure(fig, path, f"{report['model']} ({report['quantization'] or 'bf16'}): "
                                          "kernel compiles while serving, warm-up vs none")


def table(report: dict) -> str:
    lines = [f"{'mode':6} {'start s':>8} {'start cc':>8} {'work s':>8} {'work cc':>8} {'max wave s':>10}"]
    for mode, rec in report["modes"].items():
        s = rec["summary"]
        lines.append(f"{mode:6} {s['startup_s']:8.1f} {s['startup_compiles']:8d} {s['workload_s']:8.2f} "
                     f"{s['workload_compiles']:8d} {s['max_wave_s']:10.3f}  {', '.join(s['kernels_compiled_in_workload'])}")
    lines.append(f"greedy tokens identical across modes: {report['tokens_identical']}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    import torch

    now = datetime.now(timezone.utc)
    device = {"name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__}
    report = results_meta.report_header("warmup_check", __file__, argv, now, device)
    report |= {"model": f"random:{args.model} ({args.layers} layers)", "quantization": args.quantization,
               "max_num_batched_tokens": args.max_num_batched_tokens, "modes": {}}
    for mode in args.modes:
        with tempfile.TemporaryDirectory(prefix="triton_cache_") as cache, \
                tempfile.NamedTemporaryFile(suffix=".json") as rec:
            env = {**os.environ, "TRITON_CACHE_DIR": cache}
            cmd = [sys.executable, __file__, *argv, "--child", mode, "--child-out", rec.name]
            done = subprocess.run(cmd, env=env, timeout=900)
            if done.returncode:
                raise SystemExit(f"{mode}: child exited {done.returncode}")
            record = json.loads(Path(rec.name).read_text())
        record["summary"] = summarize(record)
        report["modes"][mode] = record
        print(mode, record["summary"], flush=True)
    tokens = [[w["tokens"] for w in rec["waves"]] for rec in report["modes"].values()]
    report["tokens_identical"] = all(t == tokens[0] for t in tokens)
    out = args.out or results_meta.RESULTS_DIR
    if out.suffix != ".json":
        out = out / f"warmup_check_{results_meta.slug(device['name'])}_{now:%Y-%m-%d}.json"
    results_meta.save_report(out, report, plot, table)


if __name__ == "__main__":
    main(sys.argv[1:])
