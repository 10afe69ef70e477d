"""FP8 on one GPU against bf16 in the same run: issue 18's speed figures.

Sections, each its own engine(s), one after another in one process (same ceilings):

- ``ceilings``: device-to-device copy bandwidth; bf16 and FP8 (e4m3, ``torch._scaled_mm``)
  8192^3 matmul rates.
- ``weights``: the Llama-3-8B shape (``--model``) with bf16 weights, then FP8 weights
  (``quantization="fp8"``): decode step at batch 1 and batch 64 / 1k context (CUDA graphs, as
  serving runs) and prefill 8 x 2048. Floors: the bytes a step reads at the copy bandwidth:
  every weight as stored (FP8 linears and their scales, bf16 norms and lm_head) but one row of
  the embedding table, plus the context's K/V. Prefill as a fraction of the matmul rate of its
  weights' kind (FP8 rate for FP8 weights).
- ``kv``: the KV cache in FP8: blocks in the same memory budget (bf16 vs FP8), and the paged
  decode attention kernel alone at batch 64 x 4k context (Llama-3-8B heads, one layer) reading
  FP8 blocks vs bf16, as a fraction of the copy bandwidth.
- ``offline``: 1000 x (1024 in / 128 out) with bf16 everything, then FP8 weights + FP8 KV.

Usage (repository root, package on PYTHONPATH, one GPU):
    python benchmarks/fp8_perf.py --out benchmarks/results
    python benchmarks/fp8_perf.py --tiny --device cpu      # a smoke run (CI: tests/benchmarks)
Writes ``fp8_perf_<device>_<date>.json`` and a plot, and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_perf  # noqa: E402
import results_meta  # noqa: E402
from gpu_perf import bench_s, free_memory, log, prefill_flops, sync  # noqa: E402

TARGETS = {"decode_b1_vs_floor": 1.25, "decode_b64_vs_floor": 1.25, "decode_b1_speedup": 1.8,
           "prefill_frac_of_fp8_matmul": 0.60, "attention_fp8_frac_of_copy": 0.80, "kv_blocks_ratio": 2.0}


class Run:
    """What the sections share: arguments, device, the ceilings once measured."""

    def __init__(self, args):
        import torch

        self.args = args
        self.device = torch.device(args.device)
        self.tiny = args.tiny
        self.copy_bw = 3.0e12
        self.matmul_flops = 7.9e14  # bf16; gpu_perf.section_ceilings sets it
        self.fp8_flops = 1.5e15

    def llm(self, quantization: str | None, kv_cache_dtype: str, max_num_seqs: int | None = None):
        from splitserve import LLM

        kwargs: dict[str, Any] = {}
        if quantization:
            kwargs["quantization"] = quantization
        if kv_cache_dtype != "auto":
            kwargs["kv_cache_dtype"] = kv_cache_dtype
        t = time.perf_counter()
        llm = LLM(self.args.model, device=self.args.device, dtype="float32" if self.tiny else "bfloat16",
                  kv_cache_memory=(64 << 20) if self.tiny else (self.args.kv_gb << 30),
                  max_num_seqs=max_num_seqs or (8 if self.tiny else 256),
                  max_num_batched_tokens=256 if self.tiny else 16384, show_progress=False, **kwargs)
        log(f"engine ready in {time.perf_counter() - t:.1f} s: {self.args.model} weights "
            f"{quantization or 'bf16'}, KV {kv_cache_dtype}")
        return llm


def step_read_bytes(llm) -> float:
    """Bytes a dense model's decode step reads of the weights as the engine stores them (a MoE
    model's step reads only its routed experts: gpu_perf.py counts those): every parameter and
    buffer of the model (FP8 weights, their scales, norms, lm_head) except the embedding
    table, of which one row (a tied table is the lm_head, read whole)."""
    model = llm.engine.executor_for_tests.runner.model
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(b.numel() * b.element_size() for name, b in model.named_buffers() if "rope" not in name)
    if not model.cfg.tie_word_embeddings and hasattr(model, "embed_tokens"):
        table = model.embed_tokens.weight
        total -= table.numel() * table.element_size() - table.shape[1] * table.element_size()
    return float(total)


def section_ceilings(run: Run) -> dict:
    """gpu_perf's copy bandwidth and bf16 matmul rate (it sets ``run.copy_bw`` and
    ``run.matmul_flops``), then the e4m3 ``_scaled_mm`` rate at the same size."""
    import torch

    res = gpu_perf.section_ceilings(run)
    dev = run.device
    m = 64 if run.tiny else res["matmul_n"]  # the CPU's e4m3 matmul is slow (and means nothing there)
    a8 = [torch.randn(m, m, device=dev).to(torch.float8_e4m3fn) for _ in range(3)]
    b8 = torch.randn(m, m, device=dev).to(torch.float8_e4m3fn).t().contiguous().t()  # column-major
    one = torch.ones((), device=dev)
    i = [0]

    def mm8():
        i[0] = (i[0] + 1) % 3
        return torch._scaled_mm(a8[i[0]], b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    run.fp8_flops = 2 * m**3 / bench_s(mm8, dev, iters=5 if run.tiny else 30)
    return {"copy_bandwidth_TBps": res["copy_bandwidth_TBps"], "bf16_matmul_TFLOPs": res["matmul_TFLOPs"],
            "fp8_matmul_TFLOPs": run.fp8_flops / 1e12, "matmul_n": res["matmul_n"], "fp8_matmul_n": m}


def _decode_and_prefill(run: Run, llm, label: str, res: dict) -> None:
    from splitserve import SamplingParams

    runner = llm.engine.executor_for_tests.runner
    shape = gpu_perf.ModelShape.from_config(runner.model_cfg)
    kv_token = shape.kv_bytes_per_token(runner.kv_cache.spec.dtype.itemsize)
    b1_len, big_len, big = (16, 32, 4) if run.tiny else (128, 1024, 64)
    out_len = 8 if run.tiny else 32
    weights = step_read_bytes(llm)
    res[f"{label}_step_read_GB"] = weights / 1e9
    for batch, plen, key in ((1, b1_len, "b1"), (big, big_len, f"b{big}")):
        floor = (weights + batch * (plen + out_len / 2) * kv_token) / run.copy_bw
        t = gpu_perf.decode_step_s(llm, batch, plen, out_len, seed=batch + len(res), vocab=shape.vocab)
        res[f"{label}_decode_{key}_ms"] = 1e3 * t
        res[f"{label}_decode_{key}_floor_ms"] = 1e3 * floor
        res[f"{label}_decode_{key}_vs_floor"] = t / floor
    n_seq, n_tok = (2, 64) if run.tiny else (8, 2048)
    flops = prefill_flops(shape, [n_tok] * n_seq)
    times = []
    for rep in range(2 if run.tiny else 3):
        for i, p in enumerate(gpu_perf._distinct_prompts(n_seq, n_tok, shape.vocab, seed=1000 + rep)):
            llm.engine.add_request(f"p{label}{rep}-{i}", p, SamplingParams(max_tokens=1, temperature=0.0,
                                                                         ignore_eos=True))
        sync(run.device)
        t = time.perf_counter()
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
        sync(run.device)
        times.append(time.perf_counter() - t)
    t = min(times[1:])
    rate = run.fp8_flops if label.startswith("fp8") else run.matmul_flops
    res[f"{label}_prefill_TFLOPs"] = flops / t / 1e12
    res[f"{label}_prefill_frac_of_matmul"] = flops / t / rate


def section_weights(run: Run) -> dict:
    res: dict[str, Any] = {"model": run.args.model}
    for label, quant in (("bf16", None), ("fp8", "fp8")):
        llm = run.llm(quant, "auto")
        try:
            _decode_and_prefill(run, llm, label, res)
        finally:
            llm.shutdown()
            free_memory()
    big = "b4" if run.tiny else "b64"
    res["fp8_decode_b1_speedup"] = res["bf16_decode_b1_ms"] / res["fp8_decode_b1_ms"]
    res[f"fp8_decode_{big}_speedup"] = res[f"bf16_decode_{big}_ms"] / res[f"fp8_decode_{big}_ms"]
    res["targets"] = {k: v for k, v in TARGETS.items() if k.startswith(("decode", "prefill"))}
    return res


def _attention_s(fn: Callable[[], Any], dev, tiny: bool) -> float:
    """Seconds per call of a decode-attention launch: on CUDA replayed in a CUDA graph (launched
    one by one, the figure varied by up to 1.6x between runs of one shape on an H200,
    2026-12-03), on CPU by the host clock."""
    if dev.type != "cuda":
        return bench_s(fn, dev, warmup=5 if not tiny else 1, iters=5 if tiny else 50)
    from decode_kernel_sweep import graph_time_s

    graph_time_s([fn] * 4)  # the first timing of a run runs slow (clocks): once, discarded
    return graph_time_s([fn] * 4, reps=10)


def section_kv(run: Run) -> dict:
    import torch

    from splitserve.kernels import dispatch

    res: dict[str, Any] = {}
    for kv in ("auto", "fp8"):
        llm = run.llm(None, kv, max_num_seqs=8)
        try:
            spec = llm.engine.executor_for_tests.runner.kv_cache.spec
            res[f"kv_{'bf16' if kv == 'auto' else kv}_blocks"] = spec.num_blocks
        finally:
            llm.shutdown()
            free_memory()
    res["kv_blocks_ratio"] = res["kv_fp8_blocks"] / res["kv_bf16_blocks"]
    dev = run.device
    b, hq, hk, d, bs, n = (4, 4, 2, 32, 16, 128) if run.tiny else (64, 32, 8, 128, 16, 4096)
    max_blocks = n // bs
    num_blocks = b * max_blocks
    g = torch.Generator(device=dev).manual_seed(1)
    tables = torch.randperm(num_blocks, device=dev, generator=g).view(b, max_blocks)
    lens = torch.full((b,), n, device=dev, dtype=torch.int64)
    q = torch.randn(b, hq, d, device=dev, generator=g).to(torch.bfloat16)
    out = torch.empty_like(q)
    for label, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        kc = torch.randn(num_blocks, bs, hk, d, device=dev, generator=g).to(dtype)
        vc = torch.randn(num_blocks, bs, hk, d, device=dev, generator=g).to(dtype)
        scales = {}
        if dtype != torch.bfloat16:
            scales = {"k_scale": torch.full((hk,), 0.5, device=dev), "v_scale": torch.full((hk,), 0.25, device=dev)}
        kv_bytes = 2 * b * n * hk * d * dtype.itemsize
        t = _attention_s(lambda: dispatch.paged_decode_attention(q, kc, vc, tables, lens, d**-0.5, out=out, **scales),
                         dev, run.tiny)
        res[f"attention_{label}_us"] = 1e6 * t
        res[f"attention_{label}_frac_of_copy"] = kv_bytes / t / run.copy_bw
        if dev.type == "cuda":  # the launch shape (FP8 moves half the bytes per step) and the loop's form
            from splitserve.kernels import attention_triton as at

            for spec in ("warps=4,stages=4,short_warps=0", "warps=2,stages=4", "warps=2,stages=3", "widen=1",
                         "block_n=64,stages=3"):
                cfg = at.DecodeConfig.parse(spec, at.default_decode_config(dtype != torch.bfloat16))
                t = _attention_s(lambda c=cfg: at.paged_decode_attention(q, kc, vc, tables, lens, d**-0.5, out=out,
                                                                       cfg=c, **scales), dev, run.tiny)
                res[f"attention_{label}_{spec}_frac_of_copy"] = kv_bytes / t / run.copy_bw
        del kc, vc
    res["attention_fp8_speedup"] = res["attention_bf16_us"] / res["attention_fp8_us"]
    res["targets"] = {"kv_blocks_ratio": TARGETS["kv_blocks_ratio"],
                      "attention_fp8_frac_of_copy": TARGETS["attention_fp8_frac_of_copy"]}
    return res


def section_offline(run: Run) -> dict:
    from splitserve import SamplingParams

    n = run.args.num_requests
    in_len, out_len = (32, 8) if run.tiny else (1024, 128)
    res: dict[str, Any] = {"num_requests": n, "input_len": in_len, "output_len": out_len}
    for label, quant, kv in (("bf16", None, "auto"), ("fp8_weights_fp8_kv", "fp8", "fp8")):
        llm = run.llm(quant, kv)
        try:
            vocab = llm.engine.executor_for_tests.runner.model_cfg.vocab_size
            prompts = gpu_perf._distinct_prompts(n, in_len, vocab, seed=7)
            params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
            sync(run.device)
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            sync(run.device)
            t = time.perf_counter() - t
            res[f"{label}_s"] = t
            res[f"{label}_output_tok_s"] = sum(len(o.token_ids) for o in outs) / t
        finally:
            llm.shutdown()
            free_memory()
    res["fp8_speedup"] = res["fp8_weights_fp8_kv_output_tok_s"] / res["bf16_output_tok_s"]
    return res


SECTIONS: dict[str, Callable[[Run], dict]] = {"ceilings": section_ceilings, "weights": section_weights,
                                             "kv": section_kv, "offline": section_offline}


def format_table(report: dict) -> str:
    lines = [f"{'section':9s} {'figure':38s} value"]
    for name in SECTIONS:
        for key, value in (report.get(name) or {}).items():
            if isinstance(value, (int, float, str)) and key != "traceback":
                shown = f"{value:.4g}" if isinstance(value, float) else str(value)[:100]
                lines.append(f"{name:9s} {key:38s} {shown}")
    return "\n".join(lines)


def write_plot(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = report.get("weights") or {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    keys = [k for k in w if k.endswith("_vs_floor")]
    axes[0].bar([k.removesuffix("_vs_floor") for k in keys], [w[k] for k in keys],
                color=["#888" if k.startswith("bf16") else "#4a7" for k in keys])
    axes[0].axhline(TARGETS["decode_b1_vs_floor"], color="r", linestyle="--", label="FP8 target 1.25x")
    axes[0].set_ylabel("decode step / bytes-read floor")
    axes[0].tick_params(axis="x", labelrotation=20, labelsize=8)
    axes[0].legend(fontsize=8)
    off = report.get("offline") or {}
    bars = {k.removesuffix("_output_tok_s"): v for k, v in off.items() if k.endswith("_output_tok_s")}
    axes[1].bar(list(bars), list(bars.values()), color=["#888", "#4a7"][: len(bars)])
    axes[1].set_ylabel("offline output tok/s")
    axes[1].set_title(f"{off.get('num_requests', '')} x ({off.get('input_len', '')}/{off.get('output_len', '')})",
                      fontsize=9)
    results_meta.finish_figure(fig, path, f"FP8 vs bf16, {report.get('model')} on {report['device']['name']}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=results_meta.RESULTS_DIR)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny float32 model and shapes (smoke test; CPU works)")
    p.add_argument("--model", default=None, help="default random:llama-3-8b (--tiny: random:tiny-llama)")
    p.add_argument("--kv-gb", type=int, default=40)
    p.add_argument("--num-requests", type=int, default=None, help="offline (default 1000, tiny 8)")
    p.add_argument("--sections", default=",".join(SECTIONS))
    args = p.parse_args(argv)
    args.model = args.model or ("random:tiny-llama" if args.tiny else "random:llama-3-8b")
    args.num_requests = args.num_requests or (8 if args.tiny else 1000)
    import torch

    now = datetime.now(timezone.utc)
    dev = torch.device(args.device)
    info = {"name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else results_meta.cpu_model(),
            "torch": torch.__version__}
    report = results_meta.report_header("fp8_perf", __file__, sys.argv[1:] if argv is None else argv, now, info)
    report |= {"model": args.model, "targets": TARGETS}
    run = Run(args)
    for name in (s.strip() for s in args.sections.split(",") if s.strip()):
        log(f"section {name} ...")
        t = time.perf_counter()
        try:
            report[name] = SECTIONS[name](run)
        except Exception as exc:  # noqa: BLE001  one section's failure must not lose the others
            report[name] = {"error": f"{type(exc).__name__}: {exc}"[:800], "traceback": traceback.format_exc()[-3000:]}
        report[name]["section_s"] = round(time.perf_counter() - t, 2)
        log(f"section {name} done in {report[name]['section_s']} s"
            + (f": ERROR {report[name]['error'][:300]}" if "error" in report[name] else ""))
        free_memory()
    out = args.out / f"fp8_perf_{results_meta.slug(info['name'])}_{now:%Y-%m-%dT%H%M}.json"
    results_meta.save_report(out, report, write_plot, format_table)
    return report


if __name__ == "__main__":
    main()
