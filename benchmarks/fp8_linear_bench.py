"""The FP8 linear's GPU paths (issue 18; kernels/fp8_triton.py via `dispatch.fp8_linear`) at
Llama-3-8B's projection shapes, on one GPU, against bf16 ``F.linear``.

Per shape (N x K), scheme (per channel, 128x128 blocks) and row count M:

- the path `dispatch.fp8_linear` takes (weight-only below `FP8_WEIGHT_ONLY_MAX_M` rows, then
  block W8A8 or ``torch._scaled_mm``) and its relative (Frobenius) error against its oracle in
  kernels/fp8.py computed in float32 on the same device (`fp8_weight_only_ref` or
  `fp8_linear_ref`); it passes under `MAX_REL_ERR` (a bf16 output rounding is ~4e-3);
- its time (``triton.testing.do_bench``, median) beside bf16 ``F.linear`` on the dequantized
  weight, and for the weight-only rows the bytes it must read (e4m3 weight + scales + x + out)
  over the time, against the device-to-device copy bandwidth (bytes read + written per
  second, as gpu_perf.py counts it);
- for weight-only rows, every split-K in `SPLIT_KS` (the launch parameter to tune), the best kept.

``--smoke`` runs tiny shapes on the CPU in Triton's interpreter (the plumbing, for the test).

Usage (repository root, package on PYTHONPATH):
    python benchmarks/fp8_linear_bench.py                     # H200: JSON + PNG in benchmarks/results
    python benchmarks/fp8_linear_bench.py --smoke --out /tmp/fp8.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_meta, beside this script
import results_meta  # noqa: E402

BENCHMARK = "fp8_linear_bench"
#: Llama-3-8B: qkv, o, gate|up, down (N, K).
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
SMOKE_SHAPES = {"small": (96, 256), "ragged": (72, 200)}
ROWS = (1, 8, 32, 33, 256, 2048)
SMOKE_ROWS = (1, 5, 40)
SPLIT_KS = (1, 2, 4, 8)
MAX_REL_ERR = 1e-2


def weight_only_bytes(n: int, k: int, m: int, scale_bytes: int, act_bytes: int = 2) -> int:
    """What the weight-only GEMM must move: the e4m3 weight once, its scales, x read, out written."""
    return n * k + scale_bytes + m * k * act_bytes + m * n * act_bytes


def rel_error(got, want) -> float:
    diff = (got.float() - want.float()).norm().item()
    return diff / max(want.float().norm().item(), 1e-30)


class Timer:
    def __init__(self, device, reps: int):
        self.device, self.reps = device, reps

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Median seconds of one call."""
        if self.device.type == "cuda":
            import triton

            return triton.testing.do_bench(fn, rep=self.reps, return_mode="median") / 1e3
        fn()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def measure_copy_bw(device, smoke: bool) -> float:
    import torch

    n = (1 << 20) if smoke else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = Timer(device, 100)(lambda: dst.copy_(src))
    return 2 * n / seconds


def measure(name: str, n: int, k: int, m: int, scheme, device, dtype, timer: Timer, copy_bw: float) -> dict:
    import torch
    import torch.nn.functional as F

    import dataclasses

    from splitserve.kernels import dispatch, linear_triton
    from splitserve.kernels.fp8 import Fp8Scheme, fp8_linear_ref, fp8_weight_only_ref, quantize

    gen = torch.Generator(device=device).manual_seed(n * 31 + k * 7 + m)
    w = quantize(torch.randn(n, k, device=device, generator=gen) * 0.02, scheme)
    x = torch.randn(m, k, device=device, generator=gen).to(dtype)
    weight_only = m <= dispatch.FP8_WEIGHT_ONLY_MAX_M
    w8a8_skinny = not weight_only and m <= dispatch.FP8_SKINNY_W8A8_MAX_M and scheme.value != "block"
    path = ("weight_only" if weight_only else "skinny_w8a8" if w8a8_skinny
            else "block_w8a8" if scheme.value == "block" else "scaled_mm")
    got = dispatch.fp8_linear(x, w)
    oracle = fp8_weight_only_ref if weight_only else fp8_linear_ref
    err = rel_error(got, oracle(x.float(), w))
    row = {"shape": name, "n": n, "k": k, "m": m, "scheme": scheme.value, "path": path, "rel_err": err,
           "ok": err <= MAX_REL_ERR}
    dense = w.dequantize(dtype)
    row["bf16_s"] = timer(lambda: F.linear(x, dense))
    row["fp8_s"] = timer(lambda: dispatch.fp8_linear(x, w))
    row["speedup_vs_bf16"] = row["bf16_s"] / row["fp8_s"]
    if weight_only:
        block = w.block if w.scheme is Fp8Scheme.BLOCK else None
        base = linear_triton.fp8_skinny_config(n, k, linear_triton.sms(x.device), block)
        splits = {s: timer(lambda s=s: linear_triton.skinny_linear(
            x, w.data, config=dataclasses.replace(base, split_k=s, dot_f16=base.dot_f16 and x.dtype != torch.float32),
            scale=w.scale, scale_block=block)) for s in SPLIT_KS}
        best = min(splits, key=splits.get)
        moved = weight_only_bytes(n, k, m, w.scale.numel() * 4, x.element_size())
        row.update(split_k_s={str(s): t for s, t in splits.items()}, best_split_k=best,
                   bytes=moved, frac_of_copy_bw=moved / row["fp8_s"] / copy_bw,
                   best_frac_of_copy_bw=moved / splits[best] / copy_bw)
    print(f"{name:8} {scheme.value:7} M={m:5} {path:11} err {err:.1e} fp8 {row['fp8_s'] * 1e6:8.1f} us  "
          f"bf16 {row['bf16_s'] * 1e6:8.1f} us  x{row['speedup_vs_bf16']:.2f}", flush=True)
    return row


def format_table(report: dict[str, Any]) -> str:
    lines = ["shape    scheme  M      path        rel_err  fp8_us   bf16_us  speedup  %copyBW best_split"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"{r.get('shape', '?'):8} FAILED {r['error']}")
            continue
        frac = f"{100 * r['frac_of_copy_bw']:6.1f}" if "frac_of_copy_bw" in r else "     -"
        lines.append(f"{r['shape']:8} {r['scheme']:7} {r['m']:<6} {r['path']:11} {r['rel_err']:.1e}  "
                     f"{r['fp8_s'] * 1e6:7.1f}  {r['bf16_s'] * 1e6:7.1f}  {r['speedup_vs_bf16']:6.2f}  {frac}  "
                     f"{r.get('best_split_k', '-')}")
    lines.append(f"all ok: {report['all_ok']}")
    return "\n".join(lines)


def write_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [r for r in report["rows"] if "error" not in r]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for scheme in ("channel", "block"):
            pts = [(r["m"], r["speedup_vs_bf16"]) for r in rows if r["shape"] == shape and r["scheme"] == scheme]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{shape} {scheme}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("rows M (tokens)")
    ax.set_ylabel("bf16 time / fp8 time")
    ax.legend(fontsize=7)
    results_meta.finish_figure(fig, path, f"FP8 linear vs bf16 ({report['device']['name']})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, Triton interpreted")
    p.add_argument("--device", default=None)
    p.add_argument("--rows", type=int, nargs="*", default=None)
    p.add_argument("--reps", type=int, default=100, help="do_bench milliseconds per measurement")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def round_fp8_like_the_gpu_in_the_interpreter() -> None:
    """Triton's interpreter (3.9) drops the carry when a float32 -> e4m3 rounding crosses a power
    of two (1.96 -> 1.0); the GPU's cvt.rn rounds to nearest even. Smoke runs round through torch
    instead, as tests/kernels/conftest.py does, so they check our kernels and not that bug."""
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    plain = builder.create_fp_to_fp

    def fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.float8_e4m3fn).view(torch.uint8)
            return interpreter.TensorHandle(rounded.numpy(), tl.float8e4nv)
        return plain(self, src, dst_type, rounding_mode)

    builder.create_fp_to_fp = fp_to_fp


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device_name = args.device or ("cpu" if args.smoke else "cuda")
    if args.smoke and device_name == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
        os.environ["SPLITSERVE_KERNELS"] = "triton"  # dispatch takes the GPU paths on CPU tensors
    import torch
    import triton

    from splitserve.kernels.fp8 import Fp8Scheme

    device = torch.device(device_name)
    if device.type == "cpu":
        round_fp8_like_the_gpu_in_the_interpreter()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fp8_linear_bench needs a CUDA device (or --smoke on the CPU)")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    now = datetime.now(timezone.utc)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info = {"name": props.name, "sms": props.multi_processor_count}
    else:
        info = {"name": f"cpu ({results_meta.cpu_model()}), Triton interpreter"}
    info.update(torch=torch.__version__, triton=triton.__version__)
    report = results_meta.report_header(BENCHMARK, __file__, sys.argv[1:] if argv is None else argv, now, info)
    report.update(dtype=str(dtype).removeprefix("torch."), max_rel_err=MAX_REL_ERR, rows=[])
    report["copy_bw"] = measure_copy_bw(device, args.smoke)
    timer = Timer(device, args.reps)
    for name, (n, k) in (SMOKE_SHAPES if args.smoke else SHAPES).items():
        for scheme in (Fp8Scheme.CHANNEL, Fp8Scheme.BLOCK):
            for m in args.rows or (SMOKE_ROWS if args.smoke else ROWS):
                try:
                    report["rows"].append(measure(name, n, k, m, scheme, device, dtype, timer, report["copy_bw"]))
                except Exception as exc:  # recorded; the rest run
                    report["rows"].append({"shape": name, "m": m, "scheme": scheme.value,
                                           "error": f"{type(exc).__name__}: {exc}"[:300]})
                    print(f"{name} M={m} {scheme.value}: FAILED {report['rows'][-1]['error']}", flush=True)
    report["all_ok"] = all(r.get("ok") for r in report["rows"])
    out = args.out or results_meta.default_out_path(BENCHMARK, results_meta.slug(info["name"]), now)
    results_meta.save_report(out, report, write_plot, format_table)
    return report


if __name__ == "__main__":
    main()
