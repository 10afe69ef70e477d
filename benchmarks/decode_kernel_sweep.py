"""Launch shapes of the small kernels of a decode step, swept on a GPU against what they replace.

Four families, each timed as the engine runs it (many calls recorded into one CUDA graph and
replayed, so launch gaps are counted as in a graph-replayed step; every call reads a
different copy of its weights, so nothing is served from L2):

- **linear**: the skinny Triton kernel (`kernels/linear_triton.py`) at the default launch shape
  and its variants (at one row also W as the left operand, in-kernel split sums and PDL) vs
  cuBLAS (``F.linear``), rows 1, 4 and 16, at Qwen3-30B-A3B's and Llama-3-8B's bf16 matrices;
  the floor is the weight's bytes at the copy bandwidth measured here. Writes the tuned table's
  bf16 entries (the fastest shape beside cuBLAS's time: `linear_triton.bf16_skinny_config`).
- **align**: the MoE alignment kernel's chunk and warps at 64 to 2048 (token, expert) pairs.
- **attention**: the paged decode kernel at batch 1 with a 1k context, by the shortest split.
- **fp8**: e4m3 weights at Llama-3-8B's matrices, rows 1 to 64 (`sweep_fp8`); also writes the
  tuned table's FP8 entries.

The tuned table ``skinny_<gpu>.json`` (the form kernels/configs/ ships, `linear_triton.tuned_configs`)
holds the entries the run swept over the shipped table's others.

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


def linear_variants(n: int, k: int, sms: int) -> dict:
    """Launch shapes tried for a bf16 weight [n, k] at one row: the heuristic default, x as
    the MMA's left operand over rows of W per program, columns per step, shares of K and
    pipeline depth, then the options the FP8 sweep found (2026-12-03): W as the left operand,
    the split summed in the kernel, programmatic dependent launch."""
    from splitserve.kernels import linear_triton as lt

    variants = {"default": lt.skinny_config(n, k, sms)}
    for bn in (16, 32, 64):
        for split in (1, 2, 4, 8):
            for bk in (128, 256):
                for stages in (3, 4):
                    if (triton_cdiv(n, bn) * split >= sms // 2 or n <= 512) and k // split >= bk:
                        variants[f"n{bn}_k{bk}_s{split}_st{stages}"] = lt.SkinnyConfig(
                            block_n=bn, block_k=bk, split_k=split, num_stages=stages)
    for bn in (64, 128):
        for split in (1, 2, 4, 8):
            for pdl_mode in (0, 2):
                if k // split >= 128 and (triton_cdiv(n, bn) * split >= sms // 2 or n <= 512):
                    variants[f"swap_n{bn}_k128_s{split}_pdl{pdl_mode}"] = lt.SkinnyConfig(
                        block_n=bn, block_k=128, split_k=split, num_stages=3, swap_ab=True, pdl=pdl_mode)
    return variants


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
        variants = linear_variants(n, k, sms)
        default = variants["default"]
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
                results[label] = {"us": 1e6 * t, "vs_floor": t / floor, "rel_err": err, "config": cfg.__dict__}
            best = min(results, key=lambda lbl: results[lbl]["us"])
            rows.append({"shape": name, "n": n, "k": k, "rows": m, "floor_us": 1e6 * floor,
                         "cublas_us": 1e6 * cublas, "cublas_vs_floor": cublas / floor,
                         "default": default.__dict__ | results["default"], "best": best,
                         "best_us": results[best]["us"], "variants": results})
            print(f"linear {name:22s} m={m:2d} floor {1e6 * floor:6.2f} us  cublas {1e6 * cublas:6.2f}  "
                  f"default {results['default']['us']:6.2f}  best {best} {results[best]['us']:6.2f}", flush=True)
        del ws
    return rows


def bf16_table(linear_rows: list[dict], sms: int) -> dict:
    """The bf16 entries of the tuned table (`linear_triton.bf16_skinny_config`) from the linear
    family's rows: per (matrix, row count the table keys), the fastest launch shape and cuBLAS's
    time beside it. Rows measured before the variants carried their configs name them by label."""
    from splitserve.kernels import linear_triton as lt

    table = {}
    for row in linear_rows:
        if row["rows"] not in lt.TUNED_ROWS:
            continue
        best = row["variants"][row["best"]]
        config = best.get("config") or linear_variants(row["n"], row["k"], sms)[row["best"]].__dict__
        table[lt.tuned_key(lt.SkinnyMode.BF16, row["n"], row["k"], row["rows"])] = {
            "config": config, "us": row["best_us"], "label": row["best"], "cublas_us": row["cublas_us"],
            "default_us": row["default"]["us"]}
    return table


FP8_SHAPES = {k.removeprefix("llama-3-8b."): v for k, v in LINEAR_SHAPES.items() if k.startswith("llama")}


def fp8_variants(mode, n: int, k: int, sms: int, rows: int, shortlist: set | None = None) -> dict:
    """Launch shapes tried for one (mode, matrix, rows): the heuristic default (with its split
    reduced in the kernel and, for comparison, by a second launch), then W as the left operand
    (``swap_ab``) and x as it, over rows of W per program, columns per step, shares of K and
    pipeline depth."""
    import dataclasses

    from splitserve.kernels import linear_triton as lt

    w8a8 = mode in (lt.SkinnyMode.W8A8, lt.SkinnyMode.W8A8_GATED)
    gated = mode in (lt.SkinnyMode.WEIGHT_ONLY_GATED, lt.SkinnyMode.W8A8_GATED)
    default = lt.fp8_skinny_config(n, k, sms, w8a8=w8a8)
    out = {"default": default, "default_two_launches": dataclasses.replace(default, reduce_in_kernel=False)}
    width = n // 2 if gated else n
    shapes = [(True, 64, 128), (True, 64, 256), (True, 128, 128), (True, 128, 256),
              (False, 32 if w8a8 else 64, 256 if w8a8 else 128)]
    for swap, bn, bk in shapes:
        for split in (1, 2, 4, 8):
            programs = triton_cdiv(width, bn) * split
            if programs < sms // 2 or programs > 16 * sms or k // split < 2 * bk:
                continue
            label = f"{'swap' if swap else 'xa'}_n{bn}_k{bk}_s{split}"
            out[label] = lt.SkinnyConfig(block_n=bn, block_k=bk, split_k=split, num_stages=3, dot_f16=not w8a8,
                                         swap_ab=swap)
            if (w8a8 or rows > 16) and swap and bn == 128:  # 64 rows: a 128 x 64 tile per step, more warps
                out[label + "_w8"] = dataclasses.replace(out[label], num_warps=8)
    if rows > 1 and shortlist is not None:  # the full sweep at one row (and at 64, W8A8's own)
        out = {label: cfg for label, cfg in out.items() if label in shortlist or label.startswith("default")}
    return out


def sweep_fp8(copy_bw: float, rows_list=(1, 16, 64), weight_only_rows=(64,)) -> tuple[list[dict], dict]:
    """FP8 (e4m3, per-channel scales) weights at Llama-3-8B's matrices, each mode as
    `dispatch.fp8_linear` runs it (weight-only to 16 rows: e4m3 tiles widened to float16; W8A8
    from 17 to 64: x quantized per token first, that launch counted; weight-only also at the
    ``weight_only_rows`` past 16, which `linear_triton.weight_only_pays` weighs against W8A8),
    and gate | up with the SiLU in the epilogue against the two launches it replaces;
    ``_scaled_mm`` and bf16 cuBLAS for reference. The floor is the e4m3 weight's bytes at the
    copy bandwidth. Returns (rows, the tuned table: the fastest launch shape of each (mode,
    matrix, rows), the format `linear_triton.tuned_configs` reads)."""
    import torch
    import torch.nn.functional as F

    import dataclasses

    from splitserve.kernels import activation_triton, pdl
    from splitserve.kernels import fp8 as fp8_ref
    from splitserve.kernels import fp8_triton
    from splitserve.kernels import linear_triton as lt

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows_out, table, shortlists = [], {}, {}
    for name, (n, k) in FP8_SHAPES.items():
        copies = max(4, min(64, -(-(512 << 20) // (n * k))))
        bf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        q8 = [fp8_ref.quantize(w, fp8_ref.Fp8Scheme.CHANNEL) for w in bf]
        floor = n * k / copy_bw
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            kinds = [m > 16] + ([False] if m > 16 and m in weight_only_rows else [])  # W8A8 or not
            modes = [lt.SkinnyMode.of(w8, False) for w8 in kinds]
            if name == "gate_up":  # after the plain modes: the gated ones are weighed against them
                modes += [lt.SkinnyMode.of(w8, True) for w8 in kinds]
            for mode in modes:
                w8a8 = mode in (lt.SkinnyMode.W8A8, lt.SkinnyMode.W8A8_GATED)
                gated = mode in (lt.SkinnyMode.WEIGHT_ONLY_GATED, lt.SkinnyMode.W8A8_GATED)
                dense = F.linear(x.float(), q8[0].data.float() * q8[0].scale)
                want = activation_triton.silu_and_mul(dense) if gated else dense
                res: dict = {}

                def timed(label, fn, cfg=None):
                    got = fn(q8[0], bf[0]).float()
                    err = ((got - want).norm() / want.norm()).item()
                    t = graph_time_s([lambda q=q, b=b: fn(q, b) for q, b in zip(q8, bf)])
                    res[label] = {"us": 1e6 * t, "vs_floor": t / floor, "rel_err": err}
                    if cfg is not None:
                        res[label]["config"] = cfg.__dict__

                def run(q, c):
                    if w8a8:
                        xq, xs = fp8_triton.quantize_per_token(x)
                        return lt.skinny_linear(xq, q.data, config=c, scale=q.scale, x_scale=xs.view(-1),
                                                out_dtype=torch.bfloat16, gated=gated)
                    return lt.skinny_linear(x, q.data, config=c, scale=q.scale, gated=gated)

                if gated:
                    timed("bf16_cublas_then_silu", lambda q, b: activation_triton.silu_and_mul(F.linear(x, b)))
                    ungated = table.get(lt.tuned_key(lt.SkinnyMode.W8A8 if w8a8 else lt.SkinnyMode.WEIGHT_ONLY,
                                                     n, k, m))
                    if ungated is not None:  # the best plain launch, then the SiLU: what gating replaces
                        cfg = lt.SkinnyConfig(**ungated["config"])
                        timed("best_plain_then_silu", lambda q, b, c=cfg: activation_triton.silu_and_mul(
                            lt.skinny_linear(x, q.data, config=c, scale=q.scale) if not w8a8 else
                            _w8a8_plain(x, q, c)))
                else:
                    timed("bf16_cublas", lambda q, b: F.linear(x, b))
                    timed("scaled_mm", lambda q, b: fp8_triton.fp8_scaled_mm_linear(x, q))
                one_row = lt.tuned_key(lt.SkinnyMode.WEIGHT_ONLY_GATED if gated else lt.SkinnyMode.WEIGHT_ONLY, n, k, 1)
                shortlist = shortlists.get(one_row) if m == 16 else None
                variants = fp8_variants(mode, n, k, sms, m, shortlist)
                for label, cfg in variants.items():
                    timed(label, lambda q, b, c=cfg: run(q, c), cfg)
                best = min(variants, key=lambda lbl: res[lbl]["us"])
                if pdl.enabled(x.device):  # the best shape again, launched early (kernels/pdl.py)
                    for pdl_mode in (1, 2):
                        label = f"{best}_pdl{pdl_mode}"
                        variants[label] = dataclasses.replace(variants[best], pdl=pdl_mode)
                        timed(label, lambda q, b, c=variants[label]: run(q, c), variants[label])
                    best = min(variants, key=lambda lbl: res[lbl]["us"])
                key = lt.tuned_key(mode, n, k, m)
                shortlists[key] = {lbl for lbl in variants if res[lbl]["us"] <= 1.1 * res[best]["us"]}
                table[key] = {"config": variants[best].__dict__, "us": res[best]["us"], "label": best,
                              "default_us": res["default"]["us"]}
                if gated:  # whether the SiLU in the epilogue beat the plain launch and the SiLU's
                    plain = res.get("best_plain_then_silu", {}).get("us", float("inf"))
                    table[key] |= {"fused": res[best]["us"] < plain, "plain_then_silu_us": plain}
                rows_out.append({"shape": name, "mode": mode.value, "n": n, "k": k, "rows": m,
                                 "floor_us": 1e6 * floor, "best": best, "best_us": res[best]["us"],
                                 "variants": res})
                ref = res.get("bf16_cublas", res.get("bf16_cublas_then_silu"))["us"]
                print(f"fp8 {name:8s} {mode.value:18s} m={m:3d} floor {1e6 * floor:6.2f} us  bf16 {ref:6.2f}  "
                      f"default {res['default']['us']:6.2f} (two launches {res['default_two_launches']['us']:6.2f})  "
                      f"best {best} {res[best]['us']:6.2f} ({res[best]['us'] / (1e6 * floor):.2f}x floor, "
                      f"err {res[best]['rel_err']:.1e})", flush=True)
        del bf, q8
    return rows_out, table


def _w8a8_plain(x, q, cfg):
    import torch

    from splitserve.kernels import fp8_triton
    from splitserve.kernels import linear_triton as lt

    xq, xs = fp8_triton.quantize_per_token(x)
    return lt.skinny_linear(xq, q.data, config=cfg, scale=q.scale, x_scale=xs.view(-1), out_dtype=torch.bfloat16)


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
    p.add_argument("--fp8-rows", default="1,16,64",
                   help="fp8: the row counts to sweep; fewer than all update the shipped table's other entries")
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
    from splitserve.kernels import linear_triton as lt

    table, swept = {}, []
    if "linear" in families:
        table |= bf16_table(report["linear"], torch.cuda.get_device_properties(0).multi_processor_count)
        swept.append("bf16 at 1 and 16 rows")
    if "fp8" in families:
        rows = tuple(int(r) for r in args.fp8_rows.split(","))
        if not set(rows) <= set(lt.TUNED_ROWS):  # another count would overwrite its bucket's entries
            p.error(f"--fp8-rows: the table's row counts are {lt.TUNED_ROWS}, got {rows}")
        report["fp8"], fp8_table = sweep_fp8(report["copy_bandwidth_TBps"] * 1e12, rows)
        table |= fp8_table
        swept.append(f"fp8 at rows {args.fp8_rows}")
    if table:
        # The tuned table, in the form kernels/configs/ ships (linear_triton.tuned_configs): the
        # entries this run swept over the shipped table's others.
        meta = {k: report[k] for k in ("benchmark", "command", "date", "git_commit", "device")}
        shipped = lt.tuned_file(report["device"]["name"])
        if shipped.is_file():
            table = json.loads(shipped.read_text())["configs"] | table
        meta["note"] = f"{' and '.join(swept)} swept on {now:%Y-%m-%d}; any other entries from the shipped table"
        tuned = args.out / shipped.name
        results_meta.write_json(tuned, meta | {"copy_bandwidth_TBps": report["copy_bandwidth_TBps"], "configs": table})
        print(f"wrote {tuned}")
    out = args.out / f"decode_kernel_sweep_{results_meta.slug(report['device']['name'])}_{now:%Y-%m-%dT%H%M}.json"
    results_meta.write_json(out, report)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
