"""The MoE router of a decode batch on one GPU: the one-launch Triton router against what it replaces.

At Qwen3-30B-A3B's router (W: 128 experts x 2048, bf16) and 1, 4, 16 and 64 rows, each path is
timed as the engine runs it: many calls recorded into one CUDA graph and replayed
(`decode_kernel_sweep.graph_time_s`), each call reading its own copy of W so that nothing comes
from L2. The paths (all end in (weights [T, 8] float32, ids [T, 8] int32), renormalised):

- ``fused``: `moe_route_triton.router_triton`, one launch, at `router_config`'s launch shape,
  and its variants (`variants`: the other `Finish`, shares of H, experts per program, warps);
- ``two_launch``: the skinny kernel's partial sums, then `route_triton`
  (`dispatch.RouterPath.SKINNY_THEN_ROUTE`, the path before the fused kernel);
- ``cublas``: ``F.linear``, then `route_triton` (the path above `dispatch.SKINNY_MAX_ROWS`).

Beside each time: the floor (W's bytes at the copy bandwidth measured here) and whether the
path chose the same experts as the fused default (bf16 ties may rarely break differently on a
different path's float32 sums: the fraction of rows that agree). Whether the fused router pays
past 16 rows (`dispatch.SKINNY_MAX_ROWS` gates it today) is this file's 64-row column.

Usage (repository root, package on PYTHONPATH, one GPU):
    python benchmarks/router_bench.py --out benchmarks/results
Writes ``router_bench_<device>_<date>.json`` and prints a line per row count.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_meta  # noqa: E402
from decode_kernel_sweep import copy_bandwidth, graph_time_s  # noqa: E402

EXPERTS, HIDDEN, TOP_K = 128, 2048, 8  # Qwen3-30B-A3B
ROWS = (1, 4, 16, 64)


def variants(num_experts: int, hidden: int, rows: int, sms: int) -> dict:
    """Launch shapes to time: `router_config`'s ("default"), the other finish, and at one row
    (where the decode step is judged) the shares, experts per program and warps around it."""
    from dataclasses import replace

    from splitserve.kernels.moe_route_triton import Finish, RouterConfig, router_config

    default = router_config(num_experts, hidden, rows, sms)
    other = Finish.PER_BLOCK if default.finish is Finish.LAST_PROGRAM else Finish.LAST_PROGRAM
    out = {"default": default, f"finish_{other.value}": replace(default, finish=other)}
    if rows == 1:
        for block_e in (16, 32):
            for split in (4, 8, 16):
                for warps in (2, 4, 8):
                    if hidden // split < 128:
                        continue
                    cfg = RouterConfig(block_e=block_e, block_k=128, split_k=split, num_warps=warps,
                                       finish=default.finish)
                    if cfg != default:
                        out[f"e{block_e}_s{split}_w{warps}"] = cfg
    return out


def bench(rows_list=ROWS, copies: int = 64) -> list[dict]:
    """One result per row count: each path's microseconds per call and its agreement."""
    import torch
    import torch.nn.functional as F

    from splitserve.kernels import linear_triton, moe_route_triton

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    floor = EXPERTS * HIDDEN * 2 / copy_bandwidth()
    ws = [torch.randn(EXPERTS, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    results = []
    for m in rows_list:
        x = torch.randn(m, HIDDEN, device="cuda", dtype=torch.bfloat16)
        _, want = moe_route_triton.router_triton(x, ws[0], TOP_K, True)
        paths = {
            "two_launch": lambda w: moe_route_triton.route_triton(
                linear_triton.skinny_partials(x, w), TOP_K, True, logits_dtype=x.dtype),
            "cublas": lambda w: moe_route_triton.route_triton(F.linear(x, w), TOP_K, True),
        }
        configs = {f"fused_{label}": cfg for label, cfg in variants(EXPERTS, HIDDEN, m, sms).items()}
        for label, cfg in configs.items():
            paths[label] = lambda w, c=cfg: moe_route_triton.router_triton(x, w, TOP_K, True, c)
        row = {"rows": m, "floor_us": 1e6 * floor, "paths": {}}
        for label, fn in paths.items():
            _, ids = fn(ws[0])
            same = (ids == want).all(dim=-1).float().mean().item()
            t = graph_time_s([lambda w=w, f=fn: f(w) for w in ws])
            row["paths"][label] = {"us": 1e6 * t, "vs_floor": t / floor, "same_ids": same}
            if label in configs:
                row["paths"][label]["config"] = configs[label].__dict__ | {"finish": configs[label].finish.value}
        best = min((lbl for lbl in row["paths"] if lbl.startswith("fused_")), key=lambda lbl: row["paths"][lbl]["us"])
        row["best_fused"] = best
        p = row["paths"]
        print(f"router m={m:2d} floor {1e6 * floor:5.2f} us  fused {p['fused_default']['us']:6.2f}  "
              f"best {best} {p[best]['us']:6.2f}  two-launch {p.get('two_launch', {}).get('us', float('nan')):6.2f}  "
              f"cublas {p['cublas']['us']:6.2f}", flush=True)
        results.append(row)
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=results_meta.RESULTS_DIR)
    args = p.parse_args(argv)
    import torch

    now = datetime.now(timezone.utc)
    report = results_meta.report_header("router_bench", __file__, sys.argv[1:] if argv is None else argv, now,
                                        {"name": torch.cuda.get_device_name(), "torch": torch.__version__})
    report["rows"] = bench()
    out = args.out / f"router_bench_{results_meta.slug(report['device']['name'])}_{now:%Y-%m-%dT%H%M}.json"
    results_meta.write_json(out, report)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
