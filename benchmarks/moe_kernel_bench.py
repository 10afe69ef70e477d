"""The fused MoE kernel (kernels/moe_triton.py) at Qwen3-30B-A3B's layer shape, on one GPU.

Per token count T (decode batches to a long prefill): random router logits, routed top-8 of
128 experts (`route`, renormalised, as Qwen3-MoE), bf16 weights and activations, then

- the Triton kernel's error against `fused_moe_ref` run in float32 on the same (bf16-valued)
  tensors, beside the bf16 reference's own error against it (the bf16 bound): relative
  (Frobenius) and max-abs over the reference's max-abs;
- the Triton time (``triton.testing.do_bench``, median, L2 flushed) and the same inside a
  CUDA graph (as the engine's decode steps run it: no launch gaps);
- the experts one by one: per routed expert, two matmuls and the activation over the tokens
  routed to it, weighted and added into the output (the token lists are built before the
  timing, so the loop runs without host syncs);
- the bytes-read floor: the active experts' weights (each read once) plus x and out, at the
  device-to-device copy bandwidth measured in the same run (a 1 GiB torch copy, bytes read +
  written per second, as gpu_perf.py counts it).

``--fp8 channel block`` adds the same layer with FP8 (e4m3) experts of each scale scheme
(`moe.quantize_experts`): floors at one byte a weight; weight-only with the e4m3 tiles widened
both ways (float16, the default, and bf16; errors against the float32 reference of the FP8
values), and W8A8 (activations quantized, e4m3 x e4m3: the engine's choice from
`W8A8_MIN_PAIRS` pairs; errors against the reference that quantizes the activations too).
``--configs`` times extra launch shapes (`MoeConfig` specs) at every T beside the built-in
choice. ``--smoke`` runs tiny shapes in float32 on the CPU under Triton's interpreter (the
plumbing, for the test; set before triton is imported, so the script sets it itself).

Usage (repository root, package on PYTHONPATH):
    python benchmarks/moe_kernel_bench.py                       # H200: JSON + PNG in benchmarks/results
    python benchmarks/moe_kernel_bench.py --smoke --out /tmp/moe.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_meta, beside this script
import results_meta  # noqa: E402

BENCHMARK = "moe_kernel_bench"
TOKENS = (1, 8, 64, 256, 2048, 8 * 2048)
SMOKE_TOKENS = (1, 5, 33)
#: The Triton output passes when its relative error to the float32 reference is at most
#: this many times the bf16 reference's own (or under `MIN_REL_ERR`).
ERR_FACTOR = 2.0
MIN_REL_ERR = 1e-2


@dataclass(frozen=True)
class MoeShape:
    """One MoE layer: ``experts`` experts of a gated MLP hidden -> intermediate -> hidden."""

    name: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    elem_bytes: int = 2

    @property
    def expert_bytes(self) -> int:
        """gate, up and down of one expert."""
        return 3 * self.hidden * self.intermediate * self.elem_bytes

    def bytes_read(self, num_tokens: int, active_experts: int, weight_bytes: int | None = None) -> int:
        """What the layer must move at least: each active expert's weights once (``weight_bytes``
        a weight: FP8 1; default the activations' size), x read and the output written."""
        per_expert = self.expert_bytes if weight_bytes is None else 3 * self.hidden * self.intermediate * weight_bytes
        return active_experts * per_expert + 2 * num_tokens * self.hidden * self.elem_bytes

    def flops(self, num_tokens: int) -> int:
        return 2 * num_tokens * self.top_k * 3 * self.hidden * self.intermediate


QWEN3_30B_A3B = MoeShape("qwen3-30b-a3b", hidden=2048, intermediate=768, experts=128, top_k=8)
SMOKE = MoeShape("smoke", hidden=64, intermediate=48, experts=8, top_k=2, elem_bytes=4)


def floor_seconds(bytes_read: float, copy_bw: float) -> float:
    """Time to move ``bytes_read`` at the copy bandwidth (bytes read + written per second: the
    HBM's traffic rate), as gpu_perf.py's decode floor counts it."""
    return bytes_read / copy_bw


def rel_error(got, want) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


def max_rel_error(got, want) -> float:
    """Largest element error over the reference's largest magnitude."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max()).item()


def error_ok(triton_err: float, bf16_err: float) -> bool:
    return triton_err <= max(ERR_FACTOR * bf16_err, MIN_REL_ERR)


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['shape']['name']}: copy bandwidth {report['copy_bw_TBps']:.2f} TB/s (read + written), "
             f"device {report['device'].get('name')}"]
    lines.append(f"{'T':>6} {'weights':<12} {'f16':>4} {'a8':>3} {'config':<58} {'experts':>7} {'rel_err':>8} {'bf16_ref':>8} {'ok':>3} "
                 f"{'triton_us':>10} {'graph_us':>9} {'1by1_us':>9} {'floor_us':>9} {'x_floor':>7} {'TFLOP/s':>8}")
    for r in report["rows"]:
        if r.get("error"):
            lines.append(f"{r['tokens']:>6} {r.get('weights', ''):<12} {r.get('config', ''):<58} FAILED {r['error'][:90]}")
            continue
        graph = r.get("triton_graph_us")
        best = min(t for t in (r["triton_us"], graph) if t is not None)
        dot, a8 = ({None: "-", True: "yes", False: "no"}[r.get(k)] for k in ("dot_f16", "w8a8"))
        lines.append(f"{r['tokens']:>6} {r['weights']:<12} {dot:>4} {a8:>3} {r['config']:<58} {r['active_experts']:>7} {r['rel_err']:>8.1e} "
                     f"{r['bf16_ref_rel_err']:>8.1e} {'yes' if r['ok'] else 'NO':>3} {r['triton_us']:>10.1f} "
                     f"{graph if graph is not None else float('nan'):>9.1f} {r['one_by_one_us']:>9.1f} "
                     f"{r['floor_us']:>9.1f} {best / r['floor_us']:>7.2f} {r['tflops']:>8.1f}")
    return "\n".join(lines)


def write_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defaults = [r for r in report["rows"] if not r.get("error") and r.get("default")]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))

    def best(r):
        return min(t for t in (r["triton_us"], r.get("triton_graph_us")) if t)

    kinds = list(dict.fromkeys(r.get("weights", "bf16") for r in defaults))
    for n, kind in enumerate(kinds):
        rows = [r for r in defaults if r.get("weights", "bf16") == kind]
        tokens = [r["tokens"] for r in rows]
        color = f"C{n}"
        ax.plot(tokens, [best(r) for r in rows], "o-", color=color, label=f"fused Triton, {kind}")
        ax.plot(tokens, [r["floor_us"] for r in rows], ":", color=color, label=f"bytes-read floor, {kind}")
        bx.plot(tokens, [best(r) / r["floor_us"] for r in rows], "s-", color=color, label=f"fused / floor, {kind}")
        if n == 0:
            ax.plot(tokens, [r["one_by_one_us"] for r in rows], "^-", color="grey", label="experts one by one (torch)")
            bx.plot(tokens, [r["one_by_one_us"] / r["triton_us"] for r in rows], "^--", color="grey",
                    label=f"speed-up vs one by one, {kind}")
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="us per MoE layer (best of eager / CUDA graph)")
    ax.legend(fontsize=7)
    bx.axhline(1.0, color="grey", lw=0.5)
    bx.set(xscale="log", xlabel="tokens", ylabel="ratio")
    bx.legend(fontsize=7)
    results_meta.finish_figure(fig, path, f"fused MoE, {report['shape']['name']} layer, {report['device'].get('name')}, "
                                          f"{report['date'][:10]} ({report['git_commit']})")


# ---- measuring --------------------------------------------------------------------------------


class Timer:
    """Median time of a call: do_bench (and its CUDA graph twin) on CUDA, perf_counter on CPU."""

    def __init__(self, device, reps: int):
        self.device, self.reps = device, reps

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return do_bench(fn, warmup=10, rep=self.reps, return_mode="median") / 1e3
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def graph(self, fn: Callable[[], object]) -> float | None:
        if self.device.type != "cuda":
            return None
        from triton.testing import do_bench_cudagraph

        return do_bench_cudagraph(fn, rep=self.reps, return_mode="median") / 1e3


def measure_copy_bw(device, smoke: bool) -> float:
    """Bytes read + written per second of a device-to-device torch copy (1 GiB on a GPU)."""
    import torch

    n = (1 << 20) if smoke else (1 << 30)
    x = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    seconds = Timer(device, 50)(lambda: y.copy_(x))
    del x, y
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n / seconds


class Layer:
    """One layer's weights on the device, bf16 (float32 in smoke runs), and their float32 twins."""

    def __init__(self, shape: MoeShape, device, dtype, seed: int):
        import torch

        g = torch.Generator(device=device).manual_seed(seed)
        h, i, e = shape.hidden, shape.intermediate, shape.experts
        self.shape, self.device, self.dtype = shape, device, dtype
        self.w13 = (torch.randn(e, 2 * i, h, device=device, generator=g) * h ** -0.5).to(dtype)
        self.w2 = (torch.randn(e, h, i, device=device, generator=g) * i ** -0.5).to(dtype)
        self.gen = g
        self._fp8: dict = {}

    def fp8(self, scheme, quantize_experts):
        """These weights as FP8 experts of ``scheme`` (quantized once)."""
        if scheme not in self._fp8:
            self._fp8[scheme] = quantize_experts(self.w13, self.w2, scheme)
        return self._fp8[scheme]

    def inputs(self, num_tokens: int):
        import torch

        from splitserve.kernels.moe import route

        x = torch.randn(num_tokens, self.shape.hidden, device=self.device, generator=self.gen).to(self.dtype)
        logits = torch.randn(num_tokens, self.shape.experts, device=self.device, generator=self.gen)
        weights, ids = route(logits, self.shape.top_k, renormalize=True)
        return x, weights, ids


def one_by_one(x, w13, w2, weights, ids):
    """The experts one by one: build each routed expert's token list (host side, once), then
    return the call to time: per expert, its tokens' gate/up matmul, activation, down matmul,
    weighted, added into the output."""
    import torch
    import torch.nn.functional as F

    inter = w2.shape[2]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    groups, start = [], 0
    for e, n in enumerate(counts):
        if n:
            pairs = order[start:start + n]
            groups.append((e, pairs // ids.shape[1], weights.reshape(-1)[pairs].unsqueeze(1)))
        start += n
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)

    def run():
        out.zero_()
        for e, tokens, w in groups:
            gate_up = F.linear(x[tokens], w13[e])
            act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            out.index_add_(0, tokens, F.linear(act, w2[e]).float() * w)
        return out

    return run, len(groups)


def measure(layer: Layer, num_tokens: int, configs: list, timer: Timer, copy_bw: float,
            fp8_schemes: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    import torch

    from splitserve.kernels.fp8 import Fp8Scheme
    from splitserve.kernels.moe import ExpertWeights, fused_moe_ref, quantize_experts
    from splitserve.kernels.moe_triton import W8A8_MIN_PAIRS, fused_moe_triton, moe_config

    shape = layer.shape
    x, weights, ids = layer.inputs(num_tokens)
    run_1by1, active = one_by_one(x, layer.w13, layer.w2, weights, ids)
    float_experts = ExpertWeights(layer.w13, layer.w2)
    torch.testing.assert_close(run_1by1().to(x.dtype).float(), fused_moe_ref(x, float_experts, weights, ids).float(),
                               atol=5e-2, rtol=5e-2)
    t_1by1 = timer(run_1by1)
    # (label, experts, bytes a weight, widenings to time with the built-in config)
    kinds = [(str(x.dtype).removeprefix("torch."), float_experts, None, (None,))]
    for scheme in fp8_schemes:
        kinds.append((f"fp8-{scheme}", layer.fp8(Fp8Scheme(scheme), quantize_experts), 1, (True, False)))
    engine_w8a8 = num_tokens * shape.top_k >= W8A8_MIN_PAIRS
    rows = []
    for label, experts, weight_bytes, widenings in kinds:
        # The engine's launch shape for weight-only calls (and bf16), and for W8A8 ones.
        default = moe_config(num_tokens * shape.top_k, itemsize=x.element_size())
        default_w8a8 = moe_config(num_tokens * shape.top_k, True, x.element_size())
        bytes_read = shape.bytes_read(num_tokens, active, weight_bytes)
        floor = floor_seconds(bytes_read, copy_bw)
        refs = {}
        # (config, widen to float16, W8A8): FP8 also W8A8 and weight-only with each widening.
        variants = [(default, dot, False) for dot in widenings] + [(c, None, None) for c in configs
                                                                   if c not in (default, default_w8a8)]
        if experts.quantized:
            variants.insert(len(widenings), (default_w8a8, None, True))
        for cfg, dot, w8a8 in variants:
            quant_acts = bool(w8a8) or (w8a8 is None and experts.quantized and engine_w8a8)
            if quant_acts not in refs:
                # The float32 reference of these weights' values (W8A8: of the quantized
                # activations too), and the same-dtype reference's error to it.
                ref_experts = experts if experts.quantized else ExpertWeights(layer.w13.float(), layer.w2.float())
                want = fused_moe_ref(x.float(), ref_experts, weights, ids, quantize_activations=quant_acts)
                same = fused_moe_ref(x, experts, weights, ids, quantize_activations=quant_acts)
                refs[quant_acts] = (want, same, rel_error(same, want))
            want, ref_same_dtype, bf16_err = refs[quant_acts]
            engine_a8 = experts.quantized and engine_w8a8
            chosen = (cfg == (default_w8a8 if engine_a8 else default) and dot in (None, True)
                      and (w8a8 is None or w8a8 == engine_a8))
            row: dict[str, Any] = {"tokens": num_tokens, "weights": label, "config": cfg.spec(), "dot_f16": dot,
                                   "w8a8": quant_acts if experts.quantized else None, "default": chosen,
                                   "active_experts": active, "bytes_read": bytes_read, "floor_us": floor * 1e6,
                                   "one_by_one_us": t_1by1 * 1e6, "bf16_ref_rel_err": bf16_err}
            call = lambda: fused_moe_triton(x, experts, weights, ids, config=cfg, dot_f16=dot, w8a8=w8a8)  # noqa: E731
            try:
                got = call()
                row["rel_err"] = rel_error(got, want)
                row["max_rel_err"] = max_rel_error(got, want)
                row["bf16_ref_max_rel_err"] = max_rel_error(ref_same_dtype, want)
                row["ok"] = error_ok(row["rel_err"], bf16_err)
                t = timer(call)
                row["triton_us"] = t * 1e6
                row["triton_graph_us"] = None
                try:
                    graph = timer.graph(call)
                    row["triton_graph_us"] = None if graph is None else graph * 1e6
                except Exception as exc:  # recorded; the eager time stands
                    row["graph_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                best = min(v for v in (row["triton_us"], row["triton_graph_us"]) if v is not None) / 1e6
                row["vs_floor"] = best / floor
                row["speedup_vs_one_by_one"] = t_1by1 / t
                row["tflops"] = shape.flops(num_tokens) / best / 1e12
            except Exception as exc:  # out of resources for a config: recorded, the rest run
                row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            rows.append(row)
            shown = row.get("error") or (
                f"rel_err {row['rel_err']:.1e} (same-dtype ref {bf16_err:.1e}), {row['triton_us']:.1f} us "
                f"(graph {row['triton_graph_us']}), 1by1 {row['one_by_one_us']:.1f} us, floor {row['floor_us']:.1f} us")
            print(f"T={num_tokens} {label} {cfg.spec()} dot_f16={dot} w8a8={row['w8a8']}: {shown}", flush=True)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="the JSON path (the PNG goes beside it)")
    p.add_argument("--device", default=None, help="cuda (default), or cpu with --smoke")
    p.add_argument("--tokens", type=int, nargs="*", default=None, help=f"token counts (default {TOKENS})")
    p.add_argument("--configs", nargs="*", default=[], help="extra MoeConfig specs to time at every T")
    p.add_argument("--fp8", nargs="*", default=[], choices=["channel", "block"],
                   help="also FP8 (e4m3) experts with these scale schemes (weight-only and W8A8)")
    p.add_argument("--reps", type=int, default=100, help="do_bench milliseconds per measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny float32 shapes on the CPU, Triton interpreted")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device_name = args.device or ("cpu" if args.smoke else "cuda")
    if args.smoke and device_name == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch
    import triton

    from splitserve.kernels.moe_triton import MoeConfig

    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("moe_kernel_bench needs a CUDA device (or --smoke on the CPU)")
    shape = SMOKE if args.smoke else QWEN3_30B_A3B
    dtype = torch.float32 if args.smoke else torch.bfloat16
    tokens = args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS)
    configs = [MoeConfig.parse(spec) for spec in args.configs]
    now = datetime.now(timezone.utc)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info = {"name": props.name, "sms": props.multi_processor_count}
    else:
        info = {"name": f"cpu ({results_meta.cpu_model()}), Triton interpreter"}
    info.update(torch=torch.__version__, triton=triton.__version__)
    report = results_meta.report_header(BENCHMARK, __file__, sys.argv[1:] if argv is None else argv, now, info)
    report.update(shape=asdict(shape), dtype=str(dtype).removeprefix("torch."), err_factor=ERR_FACTOR,
                  min_rel_err=MIN_REL_ERR, rows=[])
    report["copy_bw"] = measure_copy_bw(device, args.smoke)
    report["copy_bw_TBps"] = report["copy_bw"] / 1e12
    print(f"copy bandwidth {report['copy_bw_TBps']:.3f} TB/s", flush=True)
    torch.manual_seed(args.seed)
    layer = Layer(shape, device, dtype, args.seed)
    timer = Timer(device, args.reps)
    for num_tokens in tokens:
        try:
            report["rows"] += measure(layer, num_tokens, configs, timer, report["copy_bw"], tuple(args.fp8))
        except Exception as exc:  # e.g. out of memory at the largest T: recorded, the rest run
            report["rows"].append({"tokens": num_tokens, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"T={num_tokens}: FAILED {report['rows'][-1]['error']}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["all_ok"] = all(r.get("ok") for r in report["rows"])
    out = args.out or results_meta.default_out_path(BENCHMARK, results_meta.slug(info["name"]), now)
    results_meta.save_report(out, report, write_plot, format_table)
    return report


if __name__ == "__main__":
    main()
