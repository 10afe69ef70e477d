"""What Triton makes of the paged decode kernel's loop: compiled for a GPU target (no GPU needed,
ptxas ships with Triton), per cache dtype and loop form, counting the instructions that say
whether the K/V loads are pipelined (``cp.async`` copies into shared memory) or plain
register loads (``ld.global``), and the MMAs.

The question it answers: does a loop step wait out its own tiles' memory round trip
(``DecodeConfig.prefetch`` exists because it does), and does that hold for the Triton on the
GPU machine too, not only the one here.

Usage (repository root, package installed):
    python benchmarks/decode_kernel_asm.py [--arch 90] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_meta  # noqa: E402

#: Llama-3-8B's heads (4 query heads per KV head), 16-token pages, no window, one split.
SHAPE = dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, D_PAD=128, BLOCK_SIZE=16, HAS_WINDOW=False, SPLIT=False,
             PRECISION="tf32", PDL=0, SWAP=False)
ARGS = {"q_ptr": "*bf16", "k_ptr": None, "v_ptr": None, "tables_ptr": "*i64", "lens_ptr": "*i64", "out_ptr": "*bf16",
        "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "scale_log2": "fp32", "window": "i32", "partition": "i32",
        **{name: "i32" for name in ("stride_qb", "stride_qh", "stride_ob", "stride_oh", "stride_tb", "stride_kb",
                                    "stride_kt", "stride_kh", "stride_vb", "stride_vt", "stride_vh")},
        "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}


def compile_counts(kv: str, block_n: int, stages: int, prefetch: bool, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from splitserve.kernels.attention_triton import _decode_kernel

    sig = dict(ARGS, k_ptr="*fp8e4nv" if kv == "fp8" else "*bf16", v_ptr="*fp8e4nv" if kv == "fp8" else "*bf16")
    consts = dict(SHAPE, BLOCK_N=block_n, QUANT=kv == "fp8", PREFETCH=prefetch)
    sig.update({name: "constexpr" for name in consts})
    names = list(_decode_kernel.arg_names)  # the signature in the kernel's parameter order
    sig = {name: sig[name] for name in names}
    # As a real launch specialises them: pointers and cache strides divisible by 16 (the
    # kernel's do_not_specialize arguments excepted), so the row loads vectorise.
    aligned = [n for n, t in sig.items() if t.startswith("*") or (n.startswith("stride_") and n != "stride_tb")]
    src = ASTSource(fn=_decode_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": stages})
    ptx = kernel.asm["ptx"]
    return {"cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"), "ld_global": ptx.count("ld.global"),
            "mma_sync": ptx.count("mma.sync"), "wgmma": ptx.count("wgmma.mma_async"),
            "shared_bytes": kernel.metadata.shared}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for Hopper")
    p.add_argument("--out", type=Path, default=None, help="write a JSON report here (a folder)")
    args = p.parse_args(argv)
    import triton

    now = datetime.now(timezone.utc)
    report = results_meta.report_header("decode_kernel_asm", __file__, sys.argv[1:] if argv is None else argv, now,
                                        {"name": f"sm_{args.arch} (compiled, not run)", "triton": triton.__version__})
    rows = []
    for kv in ("bf16", "fp8"):
        for block_n, stages, prefetch in ((32, 4, False), (32, 4, True), (64, 3, True)):
            row = {"kv": kv, "block_n": block_n, "stages": stages, "prefetch": prefetch,
                   **compile_counts(kv, block_n, stages, prefetch, args.arch)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report["rows"] = rows
    if args.out:
        out = args.out / f"decode_kernel_asm_sm{args.arch}_triton{triton.__version__}_{now:%Y-%m-%d}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
