"""Sweep the paged decode kernel's launch configs (`DecodeConfig`) on one GPU.

Each shape has Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128), bf16, pages
of 16 tokens and a shuffled block table; every row has the full context. Per shape the cache
and the reference output (float32, `paged_decode_attention_ref`) are built once; per config
the output is poisoned, checked against the reference (relative error) and timed
(`triton.testing.do_bench`, median, L2 flushed between calls). Achieved bandwidth counts the
bytes the kernel must move (K/V read once, q read, out written) over the time, as a fraction
of a measured device-to-device copy (bytes read + written, as `gpu_perf.py` does).

Stages, to stay within about a minute and a half (each new launch shape is a compile, 1-2 s):

  1. launch shapes (block_n x warps x stages) on batch 64 @ 4k, default split policy;
  2. split policies (programs_per_sm) for the best ``--top`` launch shapes, same shape;
  3. the best ``--top`` configs and the default on batch 256 @ 1k and batch 1 @ 8k, plus
     min_partition choices for batch 1.

``--budget-s`` (counted from the start) cuts a stage short; the JSON is rewritten after each
row, so a run stopped from outside keeps what it measured. ``--configs`` replaces the stages
by the given configs on every shape. The winner applies without a code change:
``SPLITSERVE_DECODE_CONFIG="<its spec>"``.

Usage (repository root, package on PYTHONPATH):
    python benchmarks/decode_attention_sweep.py --out benchmarks/results
    python benchmarks/decode_attention_sweep.py --configs "block_n=64,warps=4,stages=3" "block_n=32,stages=4"
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_meta, beside this script
import results_meta  # noqa: E402

from splitserve.kernels.attention_triton import DECODE, DecodeConfig, default_decode_config  # noqa: E402

#: A config passes when its relative error to the float32 reference is under this (bf16 I/O).
MAX_REL_ERR = 2e-2


@dataclass(frozen=True)
class Shape:
    """One decode batch: every row attends ``context`` tokens."""

    name: str
    batch: int
    context: int
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    elem_bytes: int = 2

    @property
    def kv_bytes(self) -> int:
        """K and V of every row's context, read once."""
        return 2 * self.batch * self.context * self.kv_heads * self.head_dim * self.elem_bytes

    @property
    def qo_bytes(self) -> int:
        """q read and out written."""
        return 2 * self.batch * self.q_heads * self.head_dim * self.elem_bytes

    @property
    def bytes_moved(self) -> int:
        return self.kv_bytes + self.qo_bytes


MAIN = Shape("b64_ctx4k", 64, 4096)
SHAPES = (MAIN, Shape("b256_ctx1k", 256, 1024), Shape("b1_ctx8k", 1, 8192))

#: (block_n, num_warps, num_stages), most promising first (stage 1 may be cut by the budget).
#: Stages <= 2 single-buffer K/V (load and compute serialised): kept as the old kernel's behaviour.
LAUNCH_SHAPES = ((64, 4, 3), (32, 4, 4), (64, 4, 4), (64, 8, 3), (32, 4, 3), (32, 4, 5), (128, 8, 3),
                 (64, 8, 4), (128, 4, 3), (64, 4, 2), (16, 4, 5), (128, 8, 2))
PROGRAMS_PER_SM = (2, 4, 8, 16, 32)
MIN_PARTITIONS = (128, 256, 512, 1024)


def bandwidth_fraction(bytes_moved: float, seconds: float, copy_bw: float) -> float:
    """Achieved bytes/s over the copy bandwidth (bytes read + written per second)."""
    return bytes_moved / seconds / copy_bw


def launch_configs(base: DecodeConfig) -> list[DecodeConfig]:
    return [DecodeConfig(block_n=bn, num_warps=w, num_stages=s, min_partition=base.min_partition,
                         programs_per_sm=base.programs_per_sm) for bn, w, s in LAUNCH_SHAPES]


def split_configs(best: list[DecodeConfig]) -> list[DecodeConfig]:
    """Each of ``best`` under every split policy it was not measured with."""
    return [DecodeConfig(**{**asdict(c), "programs_per_sm": pps}) for c in best for pps in PROGRAMS_PER_SM
            if pps != c.programs_per_sm]


def partition_configs(cfg: DecodeConfig) -> list[DecodeConfig]:
    return [DecodeConfig(**{**asdict(cfg), "min_partition": mp}) for mp in MIN_PARTITIONS if mp != cfg.min_partition]


def parse_configs(specs: list[str], base: DecodeConfig) -> list[DecodeConfig]:
    return [DecodeConfig.parse(spec, base) for spec in specs]


def unique(configs: list[DecodeConfig]) -> list[DecodeConfig]:
    return list(dict.fromkeys(configs))


def ranked(rows: list[dict[str, Any]], shape: str) -> list[dict[str, Any]]:
    """This shape's passing rows, fastest first."""
    return sorted((r for r in rows if r["shape"] == shape and r.get("ok")), key=lambda r: r["time_us"])


def best_configs(rows: list[dict[str, Any]], shape: str, n: int) -> list[DecodeConfig]:
    return unique([DecodeConfig.parse(r["config"]) for r in ranked(rows, shape)])[:n]


def format_table(report: dict[str, Any]) -> str:
    lines = [f"copy bandwidth {report.get('copy_bw_TBps', float('nan')):.2f} TB/s (read + written); "
             f"default {report['default_config']}"]
    for shape in report["shapes"]:
        rows = [r for r in report["rows"] if r["shape"] == shape["name"]]
        good = ranked(rows, shape["name"])
        bad = [r for r in rows if not r.get("ok")]
        lines.append(f"\n{shape['name']}: batch {shape['batch']} x {shape['context']} tokens, "
                     f"{shape['bytes_moved'] / 1e6:.1f} MB moved")
        lines.append(f"  {'config':<72} {'splits':>6} {'us':>8} {'TB/s':>6} {'frac':>6} {'rel_err':>8}")
        for r in good + bad:
            if r.get("ok"):
                lines.append(f"  {r['config']:<72} {r['splits']:>6} {r['time_us']:>8.1f} {r['TBps']:>6.2f} "
                             f"{r['frac_of_copy']:>6.3f} {r['rel_err']:>8.1e}")
            else:
                why = r.get("error") or f"rel_err {r.get('rel_err')}"
                lines.append(f"  {r['config']:<72} FAILED {why[:80]}")
    for name, r in report.get("best", {}).items():
        lines.append(f"best {name}: {r['config']}  {r['time_us']:.1f} us, {r['frac_of_copy']:.3f} of copy")
    if report.get("recommendation"):
        lines.append(f"apply with: {report['recommendation']}")
    if report.get("stopped"):
        lines.append(f"stopped early: {report['stopped']}")
    return "\n".join(lines)


# ---- GPU part -------------------------------------------------------------------------------


class Case:
    """A shape's tensors on the device and its float32 reference output."""

    def __init__(self, shape: Shape, device, seed: int):
        import torch

        from splitserve.kernels.attention import paged_decode_attention_ref

        g = torch.Generator(device=device).manual_seed(seed)
        s = shape
        blocks_per_seq = math.ceil(s.context / s.block_size)
        num_blocks = s.batch * blocks_per_seq
        self.k = torch.randn(num_blocks, s.block_size, s.kv_heads, s.head_dim, device=device, generator=g,
                             dtype=torch.bfloat16)
        self.v = torch.randn(self.k.shape, device=device, generator=g, dtype=torch.bfloat16)
        self.tables = torch.randperm(num_blocks, device=device, generator=g).view(s.batch, blocks_per_seq)
        self.lens = torch.full((s.batch,), s.context, device=device, dtype=torch.int64)
        self.q = torch.randn(s.batch, s.q_heads, s.head_dim, device=device, generator=g, dtype=torch.bfloat16)
        self.out = torch.empty_like(self.q)
        self.scale = s.head_dim ** -0.5
        self.want = paged_decode_attention_ref(self.q.float(), self.k.float(), self.v.float(), self.tables,
                                               self.lens, self.scale)
        torch.cuda.empty_cache()

    def run(self, cfg: DecodeConfig):
        from splitserve.kernels import attention_triton as at

        return at.paged_decode_attention(self.q, self.k, self.v, self.tables, self.lens, self.scale, out=self.out,
                                         cfg=cfg)


def rel_error(got, want) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


def measure_copy_bw(device) -> float:
    import torch
    from triton.testing import do_bench

    n = 1 << 30
    x = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=10, rep=50, return_mode="median")
    del x, y
    torch.cuda.empty_cache()
    return 2 * n / (ms / 1e3)


def measure(case: Case, shape: Shape, cfg: DecodeConfig, copy_bw: float, device) -> dict[str, Any]:
    import torch
    from triton.testing import do_bench

    from splitserve.kernels import attention_triton as at

    splits, partition = at.decode_partition(shape.batch * shape.kv_heads, case.tables.shape[1] * shape.block_size,
                                            device, cfg)
    row: dict[str, Any] = {"shape": shape.name, "config": cfg.spec(), **asdict(cfg), "splits": splits,
                           "partition": partition}
    t0 = time.perf_counter()
    try:
        case.out.fill_(float("nan"))
        got = case.run(cfg)
        torch.cuda.synchronize(device)
        row["compile_and_check_s"] = round(time.perf_counter() - t0, 2)
        row["rel_err"] = rel_error(got, case.want)
        row["ok"] = bool(row["rel_err"] < MAX_REL_ERR)  # NaN fails too
        if not row["ok"]:
            return row
        ms = do_bench(lambda: case.run(cfg), warmup=5, rep=30, return_mode="median")
    except Exception as exc:  # out of shared memory, compile error...: record it, keep sweeping
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        return row
    row["time_us"] = ms * 1e3
    row["TBps"] = shape.bytes_moved / (ms / 1e3) / 1e12
    row["frac_of_copy"] = bandwidth_fraction(shape.bytes_moved, ms / 1e3, copy_bw)
    return row


class Sweep:
    """Runs configs shape by shape within the time budget, saving the report after each row."""

    def __init__(self, args, report: dict[str, Any], device, t_start: float):
        self.args, self.report, self.device, self.t_start = args, report, device, t_start
        self.cases: dict[str, Case] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def case(self, shape: Shape) -> Case:
        import torch

        if shape.name not in self.cases:
            self.cases.clear()  # one shape's cache on the device at a time
            torch.cuda.empty_cache()
            self.cases[shape.name] = Case(shape, self.device, self.args.seed)
        return self.cases[shape.name]

    def run(self, shape: Shape, configs: list[DecodeConfig], until_s: float) -> None:
        done = {(r["shape"], r["config"]) for r in self.report["rows"]}
        for cfg in configs:
            if (shape.name, cfg.spec()) in done:
                continue
            if self.elapsed() > until_s:
                self.report["stopped"] = f"budget: {shape.name} cut at {self.elapsed():.0f} s"
                return
            row = measure(self.case(shape), shape, cfg, self.report["copy_bw"], self.device)
            self.report["rows"].append(row)
            shown = f"{row['time_us']:.1f} us {row['frac_of_copy']:.3f}" if row.get("ok") else \
                f"FAILED {row.get('error') or row.get('rel_err')}"
            print(f"[{self.elapsed():5.1f}s] {shape.name} {cfg.spec()} splits={row['splits']}: {shown}", flush=True)
            self.save()

    def save(self) -> None:
        rep = self.report
        rep["best"] = {s["name"]: ranked(rep["rows"], s["name"])[0] for s in rep["shapes"]
                       if ranked(rep["rows"], s["name"])}
        if MAIN.name in rep["best"]:
            rep["recommendation"] = f'SPLITSERVE_DECODE_CONFIG="{rep["best"][MAIN.name]["config"]}"'
        rep["total_s"] = round(self.elapsed(), 1)
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(rep, indent=2) + "\n")


def sweep(sw: Sweep, default: DecodeConfig, explicit: list[DecodeConfig]) -> None:
    budget, top = sw.args.budget_s, sw.args.top
    others = [s for s in SHAPES if s is not MAIN]
    if explicit:
        for shape in SHAPES:
            sw.run(shape, explicit, budget)
        return
    sw.run(MAIN, unique([default, *launch_configs(default)]), 0.55 * budget)
    sw.run(MAIN, split_configs(best_configs(sw.report["rows"], MAIN.name, top)), 0.75 * budget)
    finalists = unique([*best_configs(sw.report["rows"], MAIN.name, top), default])
    for shape in others:
        sw.run(shape, finalists, budget)
    for shape in (s for s in others if s.batch == 1):  # few programs: the split length matters most here
        for best in best_configs(sw.report["rows"], shape.name, 1):
            sw.run(shape, partition_configs(best), budget)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=results_meta.RESULTS_DIR,
                   help="a .json file, or a folder for decode_attention_sweep_<device>_<time>.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-s", type=float, default=90.0, help="wall time from the start after which stages stop")
    p.add_argument("--top", type=int, default=3, help="configs carried from one stage to the next")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", nargs="*", default=[], help="only these config specs, on every shape")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    args = parse_args(argv)
    import torch
    import triton

    if not torch.cuda.is_available():
        raise SystemExit("decode_attention_sweep needs a CUDA device")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    now = datetime.now(timezone.utc)
    props = torch.cuda.get_device_properties(device)
    info = {"name": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__}
    if args.out.suffix != ".json":
        args.out = args.out / f"decode_attention_sweep_{results_meta.slug(props.name)}_{now:%Y-%m-%dT%H%M}.json"
    default = default_decode_config()
    report = results_meta.report_header("decode_attention_sweep", __file__, sys.argv[1:] if argv is None else argv,
                                        now, info)
    report.update(default_config=default.spec(), builtin_default=DECODE.spec(), max_rel_err=MAX_REL_ERR,
                  shapes=[{**asdict(s), "kv_bytes": s.kv_bytes, "bytes_moved": s.bytes_moved} for s in SHAPES],
                  rows=[])
    report["copy_bw"] = measure_copy_bw(device)
    report["copy_bw_TBps"] = report["copy_bw"] / 1e12
    print(f"copy bandwidth {report['copy_bw_TBps']:.2f} TB/s; default {default.spec()}", flush=True)
    sw = Sweep(args, report, device, t_start)
    try:
        sweep(sw, default, parse_configs(args.configs, default))
    finally:
        sw.cases.clear()
        sw.save()
        print(format_table(report))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
