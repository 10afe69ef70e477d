"""The paged decode kernel at a decode batch's shapes, CUDA-graph timed: split policy and step.

`decode_attention_sweep.py` tunes the launch shape at batch 64 @ 4k with L2 flushed between
calls; a served decode step at batch 64 @ 1k replays the kernel inside a graph, one layer's
cache after another. This times it that way: one call per layer's cache (beyond L2), recorded
into one CUDA graph (`decode_kernel_sweep.graph_time_s`), for each ``DecodeConfig`` spec given,
at batch 64 and 1 over 1k tokens, Llama-3-8B's heads (32 / 8) and Qwen3-30B-A3B's (32 / 4), bf16
and e4m3 caches. The floor is the cache's bytes at the copy bandwidth. Writes the best spec per
(dtype, batch), ``--best-out``: the spec that is best summed over all shapes, and
``--best-bf16-out`` / ``--best-fp8-out``: the best over one cache dtype's shapes (the kernel has
a default per cache dtype, `attention_triton.DECODE` and ``DECODE_FP8``). A spec names fields
over the built-in default of the cache's dtype.

Usage (repository root, package on PYTHONPATH, one GPU):
    python benchmarks/decode_attention_batch.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_meta  # noqa: E402
from decode_kernel_sweep import copy_bandwidth, graph_time_s  # noqa: E402

SPECS = ("", "warps=4", "warps=2", "stages=3", "stages=4", "widen=1", "programs_per_sm=4", "block_n=64,stages=3")
SHAPES = {"llama-3-8b": (32, 8), "qwen3-30b-a3b": (32, 4)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=results_meta.RESULTS_DIR)
    p.add_argument("--best-out", type=Path, default=None, help="write the best spec overall here")
    p.add_argument("--best-bf16-out", type=Path, default=None, help="write the best spec over bf16 caches here")
    p.add_argument("--best-fp8-out", type=Path, default=None, help="write the best spec over FP8 caches here")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--kv", default="bf16,fp8", help="cache dtypes to time (bf16, fp8)")
    p.add_argument("--batches", default="64,1")
    p.add_argument("--specs", nargs="*", default=list(SPECS))
    args = p.parse_args(argv)
    kinds = [k.strip().lower() for k in args.kv.split(",") if k.strip()]
    if not kinds or not set(kinds) <= {"bf16", "fp8"}:
        p.error(f"--kv: bf16 and/or fp8, got {args.kv!r}")
    args.specs = [""] + [s for s in args.specs if s]  # the default first: every row reports it
    import torch

    from splitserve.kernels import attention_triton as at

    now = datetime.now(timezone.utc)
    report = results_meta.report_header("decode_attention_batch", __file__, sys.argv[1:] if argv is None else argv,
                                        now, {"name": torch.cuda.get_device_name(), "torch": torch.__version__})
    bw = copy_bandwidth()
    report["copy_bandwidth_TBps"] = bw / 1e12
    rows = []
    totals = {kv: {spec: 0.0 for spec in args.specs} for kv in ("bf16", "fp8")}
    d, bs, n = 128, 16, args.context
    for model, (hq, hk) in SHAPES.items():
        for batch in (int(b) for b in args.batches.split(",")):
            for dtype in [d for d in (torch.bfloat16, torch.float8_e4m3fn)
                          if ("fp8" if d.itemsize == 1 else "bf16") in kinds]:
                per = n // bs
                blocks = batch * per
                layers = max(2, min(32, (512 << 20) // (2 * blocks * bs * hk * d * dtype.itemsize)))
                g = torch.Generator(device="cuda").manual_seed(batch + hk)
                caches = [(torch.randn(blocks, bs, hk, d, device="cuda", generator=g).to(dtype),
                           torch.randn(blocks, bs, hk, d, device="cuda", generator=g).to(dtype)) for _ in range(layers)]
                tables = torch.randperm(blocks, device="cuda", generator=g).view(batch, per)
                lens = torch.full((batch,), n, device="cuda", dtype=torch.int64)
                q = torch.randn(batch, hq, d, device="cuda", generator=g).to(torch.bfloat16)
                scales = {}
                if dtype != torch.bfloat16:
                    scales = {"k_scale": torch.full((hk,), 0.5, device="cuda"),
                              "v_scale": torch.full((hk,), 0.25, device="cuda")}
                floor = 2 * batch * n * hk * d * dtype.itemsize / bw
                res = {}
                label = "bf16" if dtype == torch.bfloat16 else "fp8"
                base = at.DECODE_FP8 if label == "fp8" else at.DECODE
                for spec in args.specs:
                    cfg = at.DecodeConfig.parse(spec, base)
                    calls = [lambda kc=kc, vc=vc, c=cfg: at.paged_decode_attention(
                        q, kc, vc, tables, lens, d**-0.5, cfg=c, **scales) for kc, vc in caches]
                    if not rows and not res:  # the run's first timing ran slow (clocks): once, discarded
                        graph_time_s(calls)
                    t = graph_time_s(calls)
                    res[spec or "default"] = {"us": 1e6 * t, "vs_floor": t / floor}
                    totals[label][spec] += t / floor
                best = min(res, key=lambda s: res[s]["us"])
                rows.append({"model": model, "batch": batch, "context": n, "kv": label, "floor_us": 1e6 * floor,
                             "best": best, "variants": res})
                print(f"{model:14s} b{batch:<3d} {label:4s} floor {1e6 * floor:7.2f} us  default "
                      f"{res['default']['us']:7.2f}  best {best} {res[best]['us']:7.2f} "
                      f"({res[best]['vs_floor']:.2f}x)", flush=True)
                del caches
    report["rows"] = rows
    overall = {spec: totals["bf16"][spec] + totals["fp8"][spec] for spec in args.specs}
    # The shared SPLITSERVE_DECODE_CONFIG's choice: only when both dtypes were timed.
    report["best_overall"] = min(overall, key=overall.get) if len(kinds) == 2 else None
    report["best_by_kv"] = {kv: min(t, key=t.get) for kv, t in totals.items() if kv in kinds}
    out = args.out / f"decode_attention_batch_{results_meta.slug(report['device']['name'])}_{now:%Y-%m-%dT%H%M}.json"
    results_meta.write_json(out, report)
    print(f"best overall: {report['best_overall']!r}; by cache dtype: {report['best_by_kv']}; wrote {out}")
    for path, spec in ((args.best_out, report["best_overall"]), (args.best_bf16_out, report["best_by_kv"].get("bf16")),
                       (args.best_fp8_out, report["best_by_kv"].get("fp8"))):
        if path and spec is not None:
            path.write_text(spec)
    return report


if __name__ == "__main__":
    main()
