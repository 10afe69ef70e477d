#!/usr/bin/env bash
# Issues 17 and 18 (batch-1 decode): the fused MoE kernels with W's tile as the MMA's left operand
# (MoeConfig.swap): FP8 experts at one token took ~22 us against a 9 us floor whatever the tiles
# (moe_kernel_bench_h200_2026-12-03-fp8-decode-tiles.json), as the skinny kernel did before its swap.
# Swapped shapes against the default at 1 and 8 tokens, bf16 and FP8 (per-row and block scales).
# Runs at 4ba1c69 only: the swap lost and its code was removed after this measurement.
source benchmarks/device/common.sh
timeout 330 python3 benchmarks/moe_kernel_bench.py --fp8 channel block --tokens 1 8 --reps 50 --configs \
  "block_m=16,n1=64,k1=128,n2=64,k2=128,warps=4,stages=4,swap=1" \
  "block_m=16,n1=32,k1=128,n2=64,k2=128,warps=4,stages=4,swap=1" \
  "block_m=16,n1=64,k1=128,n2=128,k2=128,warps=4,stages=4,swap=1" \
  "block_m=16,n1=64,k1=256,n2=64,k2=256,warps=4,stages=3,swap=1" \
  "block_m=16,n1=64,k1=128,n2=64,k2=128,warps=4,stages=6,swap=1" \
  --out $OUT/moe_kernel_bench_h200_moe_swap.json > $OUT/moe.log 2>&1
echo "moe bench rc=$? at $(( $(date +%s) - start )) s"
grep "^T=" $OUT/moe.log | sed -e 's/ (same-dtype ref [^)]*)//' -e 's/, 1by1.*floor/ floor/' -e 's/rel_err [^,]*, //' | sed -E 's/ ([0-9.]+) us \(graph ([0-9.]{4,6})[0-9]*\)/ eager \1 graph \2/' | cut -c1-170
rm -f $OUT/*.png
