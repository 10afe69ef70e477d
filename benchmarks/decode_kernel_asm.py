"""What Triton makes of the paged decode kernel's loop: compiled for a GPU target (no GPU needed:
ptxas and cuobjdump ship with Triton), per cache dtype and tile, counting the loop's machine
instructions per iteration and per byte of K/V it moves.

Why: over an FP8 cache the kernel reached 0.35-0.49 of copy bandwidth where bf16 reached
0.65-0.99. The loop is pipelined in both (``cp.async`` copies into shared memory), but left to
itself Triton widens e4m3 after reading shared memory in the MMA operand's layout, and V's
operand wants consecutive *tokens* per thread (no 8-bit transposing ``ldmatrix`` on Hopper): V
is read a byte at a time. Half the bytes per step then cost more instructions than bf16's whole
step. ``DecodeConfig.widen_early`` (`attention_triton._staged`) widens the tiles where they are
loaded and stages them as float16 instead; the rows with ``widen_early`` count that loop.

Usage (repository root, package installed):
    python benchmarks/decode_kernel_asm.py [--arch 90] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_meta  # noqa: E402

#: Llama-3-8B's heads (4 query heads per KV head), 16-token pages, no window, one split.
SHAPE = dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, D_PAD=128, BLOCK_SIZE=16, HAS_WINDOW=False, SPLIT=False,
             PRECISION="tf32", PDL=0, SWAP=False, MERGE=False, GROUP_P2=4, SPLIT_BLOCK=16)
ARGS = {"q_ptr": "*bf16", "k_ptr": None, "v_ptr": None, "tables_ptr": "*i64", "lens_ptr": "*i64", "out_ptr": "*bf16",
        "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "counts_ptr": "*i32", "scale_log2": "fp32", "window": "i32", "partition": "i32",
        **{name: "i32" for name in ("stride_qb", "stride_qh", "stride_ob", "stride_oh", "stride_tb", "stride_kb",
                                    "stride_kt", "stride_kh", "stride_vb", "stride_vt", "stride_vh")},
        "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
#: The loop instructions reported one by one (the rest are summed).
WATCH = ("LDS.U8", "LDS.64", "LDS.128", "LDSM.16.M88.4", "LDSM.16.MT88.4", "F2FP.F16.E4M3.UNPACK_B", "HMMA.16816.F32",
         "HMMA.16816.F32.BF16", "LDGSTS.E.BYPASS.128", "LDGSTS.E.64", "PRMT", "SHFL.BFLY", "MUFU.EX2", "BAR.SYNC")


def _tools() -> Path:
    import triton.backends.nvidia as nvidia

    return Path(nvidia.__file__).parent / "bin"


def loop_counts(cubin: bytes) -> dict:
    """The innermost backward branch's body in the SASS: its length and its watched opcodes."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(_tools() / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([str(_tools() / "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True).stdout
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m.group(1), 16), at) for at, text in code if (m := re.search(r"BRA (0x[0-9a-f]+)", text))
             and int(m.group(1), 16) < at]
    lo, hi = max(loops, key=lambda span: span[1] - span[0]) if loops else (0, -1)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for at, text in code if lo <= at <= hi)
    regs = re.search(r"REG:(\d+)", usage)
    return {"loop_instructions": sum(ops.values()), "registers": int(regs.group(1)) if regs else None,
            "ops": {op: ops[op] for op in WATCH if ops[op]}}


def compile_counts(kv: str, block_n: int, stages: int, widen: bool, arch: int, warps: int = 4) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from splitserve.kernels.attention_triton import _decode_kernel

    elem = "*fp8e4nv" if kv == "fp8" else "*bf16"
    sig = dict(ARGS, k_ptr=elem, v_ptr=elem)
    consts = dict(SHAPE, BLOCK_N=block_n, QUANT=kv == "fp8", WIDEN=widen and kv == "fp8")
    sig.update({name: "constexpr" for name in consts})
    names = list(_decode_kernel.arg_names)  # the signature in the kernel's parameter order
    sig = {name: sig[name] for name in names}
    # As a real launch specialises them: pointers and cache strides divisible by 16 (the
    # kernel's do_not_specialize arguments excepted), so the row loads vectorise.
    aligned = [n for n, t in sig.items() if t.startswith("*") or (n.startswith("stride_") and n != "stride_tb")]
    src = ASTSource(fn=_decode_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    ptx = kernel.asm["ptx"]
    counts = loop_counts(kernel.asm["cubin"])
    step_bytes = 2 * block_n * SHAPE["HEAD_DIM"] * (1 if kv == "fp8" else 2)
    return {"cp_async_in_ptx": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
            "shared_bytes": kernel.metadata.shared, "kv_bytes_per_step": step_bytes,
            "instructions_per_kib": round(1024 * counts["loop_instructions"] / step_bytes, 1), **counts}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for Hopper")
    p.add_argument("--out", type=Path, default=None, help="write a JSON report here (a folder)")
    p.add_argument("--warps", type=int, nargs="+", default=[4, 2], help="warps a program (FP8's default is 2)")
    args = p.parse_args(argv)
    import triton

    now = datetime.now(timezone.utc)
    report = results_meta.report_header("decode_kernel_asm", __file__, sys.argv[1:] if argv is None else argv, now,
                                        {"name": f"sm_{args.arch} (compiled, not run)", "triton": triton.__version__})
    rows = []
    for kv, widen in (("bf16", False), ("fp8", False), ("fp8", True)):
        for block_n, stages, warps in [(32, 4, w) for w in args.warps] + [(32, 3, 2), (64, 3, 4)]:
            row = {"kv": kv, "block_n": block_n, "stages": stages, "warps": warps, "widen_early": widen,
                   **compile_counts(kv, block_n, stages, widen, args.arch, warps)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report["rows"] = rows
    if args.out:
        out = args.out / f"decode_kernel_asm_sm{args.arch}_triton{triton.__version__}_{now:%Y-%m-%d}.json"
        results_meta.write_json(out, report)
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
