"""Launch shapes of the small kernels of a decode step, swept on a GPU against what they replace.

Four families, each timed as the engine runs it (many calls recorded into one CUDA graph and
replayed, so launch gaps are counted as in a graph-replayed step; every call reads a
different copy of its weights, so nothing is served from L2):

- **linear**: the skinny Triton kernel (`kernels/linear_triton.py`) at the default launch shape
  and its variants vs cuBLAS (``F.linear``), rows 1, 4 and 16, at Qwen3-30B-A3B's and
  Llama-3-8B's matrices; the floor is the weight's bytes at the copy bandwidth measured here.
- **align**: the MoE alignment kernel's chunk and warps at 64 to 2048 (token, expert) pairs.
- **attention**: the paged decode kernel at batch 1 with a 1k context, by the shortest split.
- **fp8**: e4m3 weights at Llama-3-8B's matrices, rows 1 to 64 (`sweep_fp8`).

Usage (repository root, package on PYTHONPATH, one GPU):
    python benchmarks/decode_kernel_sweep.py --out benchmarks/results
Writes ``decode_kernel_sweep_<device>_<date>.json`` and prints the best of each family.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_meta  # noqa: E402

LINEAR_SHAPES = {  # name: (N, K)
    "qwen3-30b-a3b.qkv": (5120, 2048), "qwen3-30b-a3b.o": (2048, 4096), "qwen3-30b-a3b.router": (128, 2048),
    "llama-3-8b.qkv": (6144, 4096), "llama-3-8b.o": (4096, 4096), "llama-3-8b.gate_up": (28672, 4096),
    "llama-3-8b.down": (4096, 14336),
}


def graph_time_s(fns, reps: int = 3) -> float:
    """Seconds per call of ``fns`` (a list of no-argument calls) recorded into one CUDA graph."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns[:3]:
            f()  # compile and warm outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / (reps * len(fns))


def copy_bandwidth() -> float:
    import torch

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    end.synchronize()
    return 2 * x.numel() * 20 / (start.elapsed_time(end) / 1e3)


def sweep_linear(copy_bw: float) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from splitserve.kernels import linear_triton as lt

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, (n, k) in LINEAR_SHAPES.items():
        copies = max(4, min(128, -(-(256 << 20) // (n * k * 2))))  # more than L2 holds
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        floor = n * k * 2 / copy_bw
        default = lt.skinny_config(n, k, sms)
        variants = {"default": default}
        for bn in (16, 32, 64):
            for split in (1, 2, 4, 8):
                for bk in (128, 256):
                    for stages in (3, 4):
                        cfg = lt.SkinnyConfig(block_n=bn, block_k=bk, split_k=split, num_stages=stages)
                        if (triton_cdiv(n, bn) * split >= sms // 2 or n <= 512) and k // split >= bk:
                            variants[f"n{bn}_k{bk}_s{split}_st{stages}"] = cfg
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = F.linear(x, ws[0])
            cublas = graph_time_s([lambda w=w: F.linear(x, w) for w in ws])
            results = {}
            for label, cfg in variants.items():
                if label != "default" and m != 1 and cfg != default:
                    continue  # the full sweep at one row; the default at every row count
                got = lt.skinny_linear(x, ws[0], config=cfg)
                err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                t = graph_time_s([lambda w=w, c=cfg: lt.skinny_linear(x, w, config=c) for w in ws])
                results[label] = {"us": 1e6 * t, "vs_floor": t / floor, "rel_err": err}
            best = min(results, key=lambda lbl: results[lbl]["us"])
            rows.append({"shape": name, "n": n, "k": k, "rows": m, "floor_us": 1e6 * floor,
                         "cublas_us": 1e6 * cublas, "cublas_vs_floor": cublas / floor,
                         "default": default.__dict__ | results["default"], "best": best,
                         "best_us": results[best]["us"], "variants": results})
            print(f"linear {name:22s} m={m:2d} floor {1e6 * floor:6.2f} us  cublas {1e6 * cublas:6.2f}  "
                  f"default {results['default']['us']:6.2f}  best {best} {results[best]['us']:6.2f}", flush=True)
        del ws
    return rows


FP8_SHAPES = {k.removeprefix("llama-3-8b."): v for k, v in LINEAR_SHAPES.items() if k.startswith("llama")}


def sweep_fp8(copy_bw: float, rows_list=(1, 4, 16, 64)) -> list[dict]:
    """FP8 (e4m3, per-channel scales) weights at Llama-3-8B's matrices: the skinny kernel with
    the e4m3 tiles widened to bf16, to float16 (as `dispatch.fp8_linear` runs it to 16 rows), and
    as W8A8 (x quantized per token first, e4m3 x e4m3 products, the quantization's launch
    counted; "default" is `fp8_skinny_config(w8a8=True)`, as dispatch runs it to 64 rows), over
    launch shapes; ``_scaled_mm``; bf16 cuBLAS. The floor is the e4m3 weight's bytes at the copy
    bandwidth."""
    import torch
    import torch.nn.functional as F

    from splitserve.kernels import fp8 as fp8_ref
    from splitserve.kernels import fp8_triton
    from splitserve.kernels import linear_triton as lt

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows_out = []
    for name, (n, k) in FP8_SHAPES.items():
        copies = max(4, min(64, -(-(512 << 20) // (n * k))))
        bf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        q8 = [fp8_ref.quantize(w, fp8_ref.Fp8Scheme.CHANNEL) for w in bf]
        floor = n * k / copy_bw
        default = lt.fp8_skinny_config(n, k, sms)
        configs = {"default": default}
        for split in (1, 2, 4, 8):
            configs[f"n32_k256_s{split}"] = lt.SkinnyConfig(block_n=32, block_k=256, split_k=split, num_stages=3)
        configs["n64_k128_s4"] = lt.SkinnyConfig(block_n=64, block_k=128, split_k=4, num_stages=3)
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = F.linear(x.float(), (q8[0].data.float() * q8[0].scale)).float()
            res: dict = {}

            def timed(label, fn):
                got = fn(q8[0], bf[0]).float()
                err = ((got - want).norm() / want.norm()).item()
                t = graph_time_s([lambda q=q, b=b: fn(q, b) for q, b in zip(q8, bf)])
                res[label] = {"us": 1e6 * t, "vs_floor": t / floor, "rel_err": err}

            def w8a8(q, c):
                xq, xs = fp8_triton.quantize_per_token(x)
                return lt.skinny_linear(xq, q.data, config=c, scale=q.scale, x_scale=xs.view(-1),
                                        out_dtype=torch.bfloat16)

            timed("bf16_cublas", lambda q, b: F.linear(x, b))
            timed("scaled_mm", lambda q, b: fp8_triton.fp8_scaled_mm_linear(x, q))
            for label, cfg in configs.items():
                bf16 = lt.SkinnyConfig(**{**cfg.__dict__, "dot_f16": False})
                timed(f"bf16dot_{label}", lambda q, b, c=bf16: lt.skinny_linear(x, q.data, config=c, scale=q.scale))
                f16 = lt.SkinnyConfig(**{**cfg.__dict__, "dot_f16": True})
                timed(f"f16dot_{label}", lambda q, b, c=f16: lt.skinny_linear(x, q.data, config=c, scale=q.scale))
                w8 = lt.fp8_skinny_config(n, k, sms, w8a8=True) if label == "default" else bf16
                timed(f"w8a8_{label}", lambda q, b, c=w8: w8a8(q, c))
            fp8_only = {lbl: v for lbl, v in res.items() if lbl != "bf16_cublas"}
            best = min(fp8_only, key=lambda lbl: fp8_only[lbl]["us"])
            rows_out.append({"shape": name, "n": n, "k": k, "rows": m, "floor_us": 1e6 * floor, "best": best,
                             "best_us": res[best]["us"], "bf16_us": res["bf16_cublas"]["us"],
                             "default": default.__dict__, "variants": res})
            print(f"fp8 {name:8s} m={m:3d} floor {1e6 * floor:6.2f} us  bf16 {res['bf16_cublas']['us']:6.2f}  "
                  f"default bf16dot {res['bf16dot_default']['us']:6.2f} f16dot {res['f16dot_default']['us']:6.2f} "
                  f"w8a8 {res['w8a8_default']['us']:6.2f}  best {best} {res[best]['us']:6.2f} "
                  f"(err {res[best]['rel_err']:.1e})  scaled_mm {res['scaled_mm']['us']:6.2f}", flush=True)
        del bf, q8
    return rows_out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sweep_align() -> list[dict]:
    import torch

    from splitserve.kernels import moe_triton

    rows = []
    for pairs in (64, 128, 512, 2048):
        tokens = pairs // 8
        ids = torch.stack([torch.randperm(128, device="cuda")[:8] for _ in range(tokens)]).to(torch.int32)
        want = moe_triton.align_by_expert(ids, 128, 0, 16)
        results = {}
        for chunk in (32, 64, 128, 256):
            for warps in (4, 8, 16):
                got = moe_triton.align_by_expert(ids, 128, 0, 16, chunk=chunk, num_warps=warps)
                same = all(torch.equal(a, b) for a, b in zip(got, want))
                t = graph_time_s([lambda c=chunk, w=warps: moe_triton.align_by_expert(ids, 128, 0, 16, chunk=c,
                                                                                      num_warps=w)] * 20)
                results[f"chunk{chunk}_w{warps}"] = {"us": 1e6 * t, "same_layout": same}
        best = min(results, key=lambda lbl: results[lbl]["us"])
        rows.append({"pairs": pairs, "best": best, "variants": results})
        print(f"align pairs={pairs:5d}  chunk32_w4 {results['chunk32_w4']['us']:6.2f} us  best {best} "
              f"{results[best]['us']:6.2f}", flush=True)
    return rows


def sweep_attention() -> list[dict]:
    import torch

    from splitserve.kernels import attention_triton as at

    rows = []
    for batch, ctx in ((1, 1024), (1, 4096), (8, 1024)):
        heads, kv_heads, d, bs = 32, 4, 128, 16
        blocks = batch * ctx // bs
        layers = 8  # a different layer's cache each call: no L2 hits
        caches = [(torch.randn(blocks, bs, kv_heads, d, device="cuda", dtype=torch.bfloat16),
                   torch.randn(blocks, bs, kv_heads, d, device="cuda", dtype=torch.bfloat16)) for _ in range(layers)]
        q = torch.randn(batch, heads, d, device="cuda", dtype=torch.bfloat16)
        tables = torch.randperm(blocks, device="cuda").view(batch, -1)
        lens = torch.full((batch,), ctx, device="cuda", dtype=torch.long)
        out = torch.empty_like(q)
        results = {}
        for min_part in (512, 256, 128, 64, 32):
            for pps in (2, 4, 8):
                cfg = at.DecodeConfig.parse(f"min_partition={min_part},programs_per_sm={pps}")
                t = graph_time_s([lambda kc=kc, vc=vc, c=cfg: at.paged_decode_attention(
                    q, kc, vc, tables, lens, d**-0.5, None, out=out, cfg=c) for kc, vc in caches] * 3)
                results[f"minpart{min_part}_pps{pps}"] = {"us": 1e6 * t}
        best = min(results, key=lambda lbl: results[lbl]["us"])
        rows.append({"batch": batch, "context": ctx, "best": best, "variants": results})
        print(f"attention b{batch} ctx{ctx}: minpart256_pps2 {results['minpart256_pps2']['us']:6.2f} us  "
              f"best {best} {results[best]['us']:6.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=results_meta.RESULTS_DIR)
    p.add_argument("--families", default="linear,align,attention")
    args = p.parse_args(argv)
    import torch

    now = datetime.now(timezone.utc)
    report = results_meta.report_header("decode_kernel_sweep", __file__, sys.argv[1:] if argv is None else argv,
                                        now, {"name": torch.cuda.get_device_name(), "torch": torch.__version__})
    report["copy_bandwidth_TBps"] = copy_bandwidth() / 1e12
    families = args.families.split(",")
    if "linear" in families:
        report["linear"] = sweep_linear(report["copy_bandwidth_TBps"] * 1e12)
    if "align" in families:
        report["align"] = sweep_align()
    if "attention" in families:
        report["attention"] = sweep_attention()
    if "fp8" in families:
        report["fp8"] = sweep_fp8(report["copy_bandwidth_TBps"] * 1e12)
    out = args.out / f"decode_kernel_sweep_{results_meta.slug(report['device']['name'])}_{now:%Y-%m-%dT%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
