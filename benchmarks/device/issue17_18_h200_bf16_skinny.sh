#!/usr/bin/env bash
# Issues 17 and 18 (batch-1 decode): bf16 projections run on cuBLAS (qwen3-30b-a3b's q|k|v 7.7 us and
# o 8.9 us against 5.0 / 4.0 us floors, decode_profile 2026-12-03); the skinny Triton kernel lost to it
# on 2026-12-02, before it had W as the left operand, in-kernel split sums and PDL. This sweeps those at
# one row (the linear family of decode_kernel_sweep.py) against cuBLAS. Capped at 320 s: the shapes
# print as they finish, Qwen3-30B-A3B's first.
source benchmarks/device/common.sh
timeout 320 python3 benchmarks/decode_kernel_sweep.py --families linear --out $OUT > /tmp/sweep.log 2>&1
echo "sweep rc=$? at $(( $(date +%s) - start )) s"; grep "^linear" /tmp/sweep.log | cut -c1-170
cp /tmp/sweep.log $OUT/ ; ls $OUT
