"""What a decode step made of N kernel launches can reach at best: the floor of its bytes plus N
times the fixed cost of one kernel, both measured here on the GPU.

A decode step at batch 1 reads its weights once (the byte floor: bytes / copy bandwidth) but
does it in a few hundred dependent kernels, and each kernel costs a fixed time beyond its bytes:
its launch inside the CUDA graph, its programs' start, the latency of its first loads, its tail.
This script measures that cost and turns it into a bound:

1. ``empty``: a chain of kernels that each only write one value per SM, in one CUDA graph:
   the graph's launch-to-launch time alone.
2. ``read``: a chain of kernels that each stream X bytes (every SM busy, loads in flight, a
   partial sum a program stored), X from 16 KiB to 256 MiB, each kernel reading its own part of
   a 2 GiB buffer so that L2 holds none of it. The fit t(X) = a + X / b over X >= 1 MiB gives
   ``a``, the fixed cost of a kernel that reads at the streaming rate ``b``. With ``--pdl``
   the same chains with programmatic dependent launch (`Chain`), twice: each kernel waiting for
   the one before ahead of its loads (a kernel whose reads depend on it: norms, rotary, the
   router's top-k), and each issuing its loads before that wait (a kernel reading constants:
   weights, and a decode step's KV cache but for its newest token): the most PDL can overlap.
3. For each case (a shipped decode step: kernels per step from a torch.profiler run of it,
   bytes from its floor, read at the fitted rate) and each chain (without PDL: how the step's kernels follow each other
   now; the PDL chains: what PDL everywhere could give), ``bound = floor + kernels x a``: no design with that
   many kernels, chained that way, can beat it, however good each kernel. Beside it the step as
   measured, the issue's target, and the most kernels a step could have for the target to be
   reachable at all, ``(target - 1) x floor / a``.

The cases' kernel counts come from ``benchmarks/decode_profile.py`` results (``--profile``
files replace the built-in counts, taken from the results folder), their bytes from the floors
``gpu_perf.py`` / ``fp8_perf.py`` printed (bytes are a property of the shapes, not of a run;
the floor is recomputed at this run's copy bandwidth).

Usage (repository root, package on PYTHONPATH, one GPU):
    python benchmarks/launch_floor.py [--pdl] [--profile decode_profile_*.json ...] --out benchmarks/results
    python benchmarks/launch_floor.py --report-from launch_floor_<gpu>_<date>.json --profile ...   # no GPU:
        the cases recomputed from an earlier run's measurements (kernel counts profiled later)
Writes ``launch_floor_<device>_<date>.json`` and a plot: t(X) with its fit, and per case the
floor, the bound and the measured step against the target.
"""

from __future__ import annotations

import argparse
import enum
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_meta  # noqa: E402

from splitserve.kernels.pdl import gdc_launch_dependents, gdc_wait  # noqa: E402

#: Bytes each ``read`` kernel streams (the fit takes those of at least FIT_MIN_BYTES).
READ_SIZES = tuple(1 << s for s in range(14, 29, 2))  # 16 KiB .. 256 MiB
FIT_MIN_BYTES = 1 << 20
#: The buffer the read kernels walk through: far larger than any L2.
BUFFER_BYTES = 2 << 30


@dataclass(frozen=True)
class Case:
    """A shipped decode step and the target an issue set for it."""

    name: str
    #: Kernels a step launches (decode_profile.py's ``kernels_per_step``).
    kernels_per_step: float
    layers: int
    #: Bytes the step must read (its floor's bytes).
    read_gb: float
    #: The step as measured (CUDA graphs), and the target as a multiple of the floor.
    step_ms: float
    target_vs_floor: float
    #: Where the figures come from.
    source: str
    #: (model, quantization, batch) of the decode_profile.py runs that count this step's kernels.
    profile_key: tuple[str, str | None, int] = ("", None, 1)
    #: A target that is a time, not a multiple of the floor (FP8 1.8x faster than a measured bf16
    #: step): its multiple is then taken against each run's own floor.
    target_step_ms: float | None = None


#: The shipped steps at the end of 2026-12-03 (results README, sessions 4 and 5).
CASES = (
    Case("qwen3-30b-a3b bf16 b1 (issue 17)", 542, 48, 6.0837, 3.4595, 1.5,
         "kernels: decode_profile_h200_2026-12-03-qwen3-30b-a3b-b1-moe-pdl.json (the shipped launches; PDL adds "
         "none); bytes and step: gpu_perf_h200_2026-12-03-qwen3-30b-a3b-bf16-session5.json",
         ("random:qwen3-30b-a3b", None, 1)),
    Case("llama-3-8b fp8 b1 (issue 18)", 333, 32, 8.0549, 3.3931, 1.25,
         "kernels: decode_profile_h200_2026-12-03-llama-3-8b-fp8-b1.json; bytes (1.972 ms at 4.084 TB/s) and step: "
         "fp8_perf_h200_2026-12-03-quantizing-norms.json",
         ("random:llama-3-8b", "fp8", 1)),
    # Issue 18's other batch-1 target, FP8 1.8x faster than bf16 (4.592 ms, session 5): a step of
    # 2.551 ms, whatever this run's floor.
    Case("llama-3-8b fp8 b1, 1.8x bf16 (issue 18)", 333, 32, 8.0549, 3.3931, 0.0,
         "as above; target: bf16's 4.592 ms (gpu_perf_h200_2026-12-03-llama-3-8b-bf16-session5.json) / 1.8",
         ("random:llama-3-8b", "fp8", 1), target_step_ms=4.592 / 1.8),
)


# ---- the model: pure functions (tested on CPU) -----------------------------------------------


@dataclass(frozen=True)
class Fit:
    """t(X) = fixed_s + X / bytes_per_s, least squares over the points given."""

    fixed_s: float
    bytes_per_s: float


def fit_line(points: list[tuple[int, float]]) -> Fit:
    """Least-squares t = a + X / b over (X bytes, t seconds) points (at least two sizes)."""
    n = len(points)
    if n < 2 or len({x for x, _ in points}) < 2:
        raise ValueError(f"a fit needs two sizes or more, got {points}")
    mx = sum(x for x, _ in points) / n
    mt = sum(t for _, t in points) / n
    slope = sum((x - mx) * (t - mt) for x, t in points) / sum((x - mx) ** 2 for x, _ in points)
    if slope <= 0:
        raise ValueError(f"time does not grow with the bytes read: {points}")
    return Fit(fixed_s=mt - slope * mx, bytes_per_s=1.0 / slope)


def bound(case: Case, fixed_s: float, copy_bytes_per_s: float, read_bytes_per_s: float | None = None) -> dict:
    """The case against the launch-bound floor. The floor (which the targets are multiples of)
    is the step's bytes at the copy bandwidth; the bound is those bytes at the read kernels'
    own fitted rate (``read_bytes_per_s``, faster than a copy's; the copy's if not given) plus
    ``kernels x fixed``, so that no kernel of that chain, reading at that rate, beats it."""
    floor_ms = case.read_gb * 1e9 / copy_bytes_per_s * 1e3
    bound_ms = case.read_gb * 1e9 / (read_bytes_per_s or copy_bytes_per_s) * 1e3 + case.kernels_per_step * fixed_s * 1e3
    target = case.target_step_ms / floor_ms if case.target_step_ms else case.target_vs_floor
    max_kernels = max(0.0, target * floor_ms - (bound_ms - case.kernels_per_step * fixed_s * 1e3)) / (fixed_s * 1e3)
    return {"case": case.name, "fixed_us": fixed_s * 1e6, "kernels_per_step": case.kernels_per_step,
            "kernels_per_layer": case.kernels_per_step / case.layers, "floor_ms": floor_ms,
            "bound_ms": bound_ms, "bound_vs_floor": bound_ms / floor_ms, "step_ms": case.step_ms,
            "step_vs_floor": case.step_ms / floor_ms, "target_vs_floor": target,
            "target_reachable_with_these_kernels": bound_ms / floor_ms <= target,
            "max_kernels_per_step_for_target": max_kernels,
            "max_kernels_per_layer_for_target": max_kernels / case.layers,
            "fixed_cost_share_of_step": case.kernels_per_step * fixed_s * 1e3 / case.step_ms}


def with_profiles(cases: tuple[Case, ...], profiles: list[dict]) -> tuple[Case, ...]:
    """Each case whose decode_profile.py run is among ``profiles`` takes that run's kernel count."""
    out = []
    for case in cases:
        match = next((p for p in profiles if (p.get("model"), p.get("quantization"), p.get("batch")) == case.profile_key),
                     None)
        out.append(case if match is None else replace(
            case, kernels_per_step=float(match["kernels_per_step"]),
            source=case.source + f"; kernels recounted here ({match.get('git_commit')})"))
    return tuple(out)


# ---- the GPU measurements ---------------------------------------------------------------------


class Chain(enum.Enum):
    """How each kernel of a measured chain follows the one before (the ``PDL`` constexpr)."""

    #: Launched when the one before has finished (as the decode step's kernels mostly are).
    NONE = "none"
    #: PDL, waiting for the one before ahead of any load.
    PDL_WAIT_FIRST = "pdl_wait_first"
    #: PDL, the loads issued before the wait (only the store waits).
    PDL_LOADS_FIRST = "pdl_loads_first"

    @property
    def code(self) -> int:
        return list(Chain).index(self)

    @classmethod
    def of_run(cls, run: dict) -> "Chain":
        """A run's chain (runs of 7cbe608 had ``pdl``: True for loads first)."""
        if "chain" in run:
            return cls(run["chain"])
        return cls.PDL_LOADS_FIRST if run["pdl"] else cls.NONE


@triton.jit
def _tick(out_ptr, PDL: tl.constexpr):
    """One value stored per program: a kernel with nothing to do but exist."""
    if PDL != 0:
        gdc_launch_dependents()
        gdc_wait()
    tl.store(out_ptr + tl.program_id(0), 1)


@triton.jit
def _read(x_ptr, out_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Grid-stride over n int32 words; each program stores its sum, so that no load is dead.
    PDL: `Chain.code` (1: wait before the loads, 2: only before the store)."""
    if PDL != 0:
        gdc_launch_dependents()
    if PDL == 1:
        gdc_wait()
    pid, step = tl.program_id(0), tl.num_programs(0) * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0)
    if PDL == 2:  # the reads are of constants (as a decode step's weights): only the store waits
        gdc_wait()
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def measure(chain: Chain, reps: int = 5) -> dict:
    import torch
    import triton
    from decode_kernel_sweep import copy_bandwidth, graph_time_s

    from splitserve.kernels import pdl as pdl_mod

    props = torch.cuda.get_device_properties(0)
    sms, l2 = props.multi_processor_count, props.L2_cache_size
    pdl = chain.code
    launch = pdl_mod.launch_kwargs(pdl)
    out = torch.zeros(64 * sms, dtype=torch.int32, device="cuda")
    length = 2000
    empty_s = graph_time_s([lambda: _tick[(sms,)](out, PDL=pdl, **launch)] * length, reps)

    buf = torch.ones(BUFFER_BYTES // 4, dtype=torch.int32, device="cuda")
    block, warps = 2048, 4
    points = []
    for size in READ_SIZES:
        words = size // 4
        grid = max(1, min(triton.cdiv(words, block), 8 * sms))
        # Enough kernels that a graph replay walks well past L2 (each its own part of the buffer).
        count = max(32, min(4000, math.ceil(3 * l2 / size)))
        starts = [(j * words) % (buf.numel() - words) for j in range(count)]
        calls = [lambda s=s: _read[(grid,)](buf[s:s + words], out, words, BLOCK=block, PDL=pdl,
                                           num_warps=warps, **launch) for s in starts]
        points.append((size, graph_time_s(calls, reps)))
    fit = fit_line([p for p in points if p[0] >= FIT_MIN_BYTES])
    return {"chain": chain.value, "sms": sms, "l2_bytes": l2, "empty_kernel_us": empty_s * 1e6,
            "read": [{"bytes": x, "us": t * 1e6, "GBps": x / t / 1e9} for x, t in points],
            "fit_fixed_us": fit.fixed_s * 1e6, "fit_GBps": fit.bytes_per_s / 1e9,
            "copy_GBps": copy_bandwidth() / 1e9}


# ---- report -----------------------------------------------------------------------------------


def plot(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for run in report["runs"]:
        xs = [r["bytes"] for r in run["read"]]
        label = Chain.of_run(run).value
        left.loglog(xs, [r["us"] for r in run["read"]], "o-", label=f"read kernel, {label}")
        fit = [run["fit_fixed_us"] + x / (run["fit_GBps"] * 1e3) for x in xs]
        left.loglog(xs, fit, "--", label=f"fit: {run['fit_fixed_us']:.2f} us + X / {run['fit_GBps']:.0f} GB/s")
        left.axhline(run["empty_kernel_us"], ls=":", color="grey")
    left.set_xlabel("bytes one kernel reads")
    left.set_ylabel("us a kernel, in a CUDA graph chain")
    left.legend(fontsize=8)
    names = list(dict.fromkeys(r["case"] for r in report["cases"]))
    ys = range(len(names))
    bars = [("floor (bytes)", "floor_ms", Chain.NONE), ("floor + kernels x fixed cost", "bound_ms", Chain.NONE),
            ("the same, PDL waiting first", "bound_ms", Chain.PDL_WAIT_FIRST),
            ("the same, PDL loading first", "bound_ms", Chain.PDL_LOADS_FIRST), ("measured step", "step_ms", Chain.NONE)]
    h = 0.16
    for i, (label, key, chain) in enumerate(bars):
        widths = []
        for name in names:
            row = next((r for r in report["cases"] if r["case"] == name and r["chain"] == chain.value), None)
            widths.append(row[key] if row is not None else 0.0)
        right.barh([y + (2 - i) * h for y in ys], widths, height=h, label=label)
    for y, name in zip(ys, names):
        r = next(r for r in report["cases"] if r["case"] == name)
        right.plot([r["target_vs_floor"] * r["floor_ms"]] * 2, [y - 0.45, y + 0.45], "k-", lw=2)
    right.set_yticks(list(ys), [f"{n}\n{next(r for r in report['cases'] if r['case'] == n)['kernels_per_step']:.0f} kernels"
                                for n in names], fontsize=8)
    right.set_xlabel("ms a step (black: the target)")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.4, -0.14), ncol=3)
    results_meta.finish_figure(fig, path, f"Launch-bound floor of a decode step, {report['device']['name']}")


def table(report: dict) -> str:
    lines = []
    for run in report["runs"]:
        lines.append(f"{Chain.of_run(run).value}: empty kernel {run['empty_kernel_us']:.2f} us; read fit "
                     f"{run['fit_fixed_us']:.2f} us + X / {run['fit_GBps']:.0f} GB/s; copy {run['copy_GBps']:.0f} GB/s")
        lines += [f"  {r['bytes']:>10} B  {r['us']:8.2f} us  {r['GBps']:7.0f} GB/s" for r in run["read"]]
    for r in report["cases"]:
        lines.append(f"  {r['case']}, {r['chain']} ({r['fixed_us']:.2f} us a kernel): floor "
                     f"{r['floor_ms']:.3f} ms, bound {r['bound_ms']:.3f} ms = {r['bound_vs_floor']:.2f}x (target "
                     f"{r['target_vs_floor']:.2f}x: {'reachable' if r['target_reachable_with_these_kernels'] else 'NOT reachable'}"
                     f" with {r['kernels_per_step']:.0f} kernels; at most {r['max_kernels_per_layer_for_target']:.1f} a layer "
                     f"would allow it), measured {r['step_ms']:.3f} ms = {r['step_vs_floor']:.2f}x")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pdl", action="store_true", help="also measure the chains with programmatic dependent launch")
    p.add_argument("--profile", type=Path, nargs="*", default=[], help="decode_profile.py results: their kernel counts")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--report-from", type=Path, default=None,
                   help="a launch_floor result: take its GPU measurements (no GPU needed) and recompute the cases")
    p.add_argument("--out", type=Path, default=results_meta.RESULTS_DIR)
    args = p.parse_args()

    import torch

    now = datetime.now(timezone.utc)
    if args.report_from is not None:  # recompute the cases from measurements made before
        measured = json.loads(args.report_from.read_text())
        name, runs = measured["device"]["name"], measured["runs"]
        device = measured["device"] | {"measured_in": str(args.report_from.name), "measured_at": measured["date"]}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("launch_floor.py measures a GPU: none is visible")
        name = torch.cuda.get_device_name(0)
        device = {"name": name, "torch": torch.__version__}
        runs = [measure(chain, args.reps) for chain in (list(Chain) if args.pdl else [Chain.NONE])]
    copy = max(run["copy_GBps"] for run in runs) * 1e9
    cases = with_profiles(CASES, [json.loads(f.read_text()) for f in args.profile])
    report = results_meta.report_header("launch_floor", __file__, sys.argv[1:], now, device)
    # One bound per case and chain: without PDL (how the step's kernels follow each other now), and
    # with PDL everywhere, each kernel waiting first, or loading first (the most PDL can give).
    rows = [bound(c, run["fit_fixed_us"] * 1e-6, copy, run["fit_GBps"] * 1e9) | {"chain": Chain.of_run(run).value}
            for c in cases for run in runs]
    report |= {"runs": runs, "cases": rows,
               "case_sources": [asdict(c) for c in cases]}
    out = args.out
    if out.suffix != ".json":
        out = results_meta.default_out_path("launch_floor", results_meta.slug(name), now) if out == results_meta.RESULTS_DIR \
            else out / f"launch_floor_{results_meta.slug(name)}_{now:%Y-%m-%d}.json"
    results_meta.save_report(out, report, plot, table)


if __name__ == "__main__":
    main()
