"""The fused MoE kernels compiled for Hopper (sm_90) here, no GPU needed (ptxas ships with
Triton): the interpreter runs Python, so code that Triton's code generator refuses (an early
return under a constexpr branch, in the first FP8 version) passes the interpreter tests and
fails only on a GPU. Every weight kind, widening and W8A8 variant the engine launches is compiled."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Compiled in a process of its own: another test may have put the kernels under the interpreter.
_COMPILE = '''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from splitserve.kernels.moe_triton import _down_kernel, _gate_up_kernel

INDEX = ("sorted_ptr", "block_expert_ptr", "ids_ptr")
# (scale kind, widen to float16, W8A8, direct, (block_m, block_n, block_k, warps, stages)): decode's
# direct launches of every weight kind, aligned ones, and W8A8's wide prefill tiles.
DECODE, WIDE = (16, 32, 128, 4, 4), (128, 128, 128, 8, 3)
VARIANTS = [(scale, dot, False, direct, DECODE) for scale, dot in ((0, False), (1, False), (1, True), (2, False),
                                                                    (2, True)) for direct in (True, False)]
VARIANTS += [(1, False, True, False, DECODE), (2, False, True, False, DECODE), (1, False, True, False, WIDE),
             (2, False, True, False, WIDE)]
for scale, dot_f16, a8, direct, (bm, bn, bk, warps, stages) in VARIANTS:
    weight = "*fp8e4nv" if scale else "*bf16"
    act = "*fp8e4nv" if a8 else "*bf16"
    consts = dict(DIRECT=direct, PRECISION="tf32", SCALE=scale, SCALE_BN=128 if scale == 2 else 1,
                  SCALE_BK=128 if scale == 2 else 1, DOT_F16=dot_f16, A8=a8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    for fn, ptrs in ((_gate_up_kernel, {"x_ptr": act, "w13_ptr": weight, "out_ptr": "*bf16"}),
                     (_down_kernel, {"h_ptr": act, "w2_ptr": weight, "slots_ptr": "*bf16"})):
        names = list(fn.arg_names)
        sig = {n: "constexpr" if n in consts else ptrs.get(n) or ("*i32" if n in INDEX else "*fp32")
               if n.endswith("_ptr") else "i32" for n in names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        print("compiled", fn.__name__, scale, dot_f16, a8, direct, bm)
'''


def test_fused_moe_kernels_compile_for_sm90_with_every_weight_kind():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("compiled") == 28


# Every shape `moe_config` launches, bf16 and float32 operands: the shared memory each needs.
_SHARED = '''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from splitserve.kernels.moe_triton import _down_kernel, _gate_up_kernel, CONFIGS, moe_config

INDEX = ("sorted_ptr", "block_expert_ptr", "ids_ptr")
for bound, _ in CONFIGS:
    for dtype, precision, itemsize in (("*bf16", "tf32", 2), ("*fp32", "ieee", 4)):
        cfg = moe_config(min(bound, 1 << 20), itemsize=itemsize)
        for fn, names_io, bn, bk in ((_gate_up_kernel, ("x_ptr", "w13_ptr", "out_ptr"), cfg.block_n1, cfg.block_k1),
                                     (_down_kernel, ("h_ptr", "w2_ptr", "slots_ptr"), cfg.block_n2, cfg.block_k2)):
            consts = dict(DIRECT=False, PRECISION=precision, SCALE=0, SCALE_BN=1, SCALE_BK=1, DOT_F16=False, A8=False,
                          BLOCK_M=cfg.block_m, BLOCK_N=bn, BLOCK_K=bk)
            names = list(fn.arg_names)
            sig = {n: "constexpr" if n in consts else (dtype if n in names_io else "*i32" if n in INDEX else "*fp32")
                   if n.endswith("_ptr") else "i32" for n in names}
            src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            print("shared", fn.__name__, bound, itemsize, kernel.metadata.shared)
'''


def test_every_launch_shape_fits_hoppers_shared_memory_in_bf16_and_float32():
    """A shape that needs more shared memory than an SM has fails at its first launch on the GPU
    (a float32 model's prefill of 65-512 tokens did, at 240 KiB, until `moe_config` halved its K
    steps for 4-byte operands)."""
    pytest.importorskip("triton")
    from splitserve.kernels.moe_triton import CONFIGS, SHARED_MEMORY_LIMIT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _SHARED], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    used = [line.split() for line in run.stdout.splitlines() if line.startswith("shared")]
    assert len(used) == 4 * len(CONFIGS)
    over = [u for u in used if int(u[-1]) > SHARED_MEMORY_LIMIT]
    assert not over, over
