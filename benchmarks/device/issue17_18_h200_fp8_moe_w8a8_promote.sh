#!/usr/bin/env bash
# Issues 17 and 18: the fused MoE kernel's W8A8 with per-row scales after each step's e4m3 product
# joins the float32 sum on its own (review finding), at prefill sizes: error and time against the
# earlier run (moe_kernel_bench_h200_2026-12-03-fp8-w8a8.json).
source benchmarks/device/common.sh
timeout 200 python3 benchmarks/moe_kernel_bench.py --fp8 channel block --tokens 2048 16384 --reps 50 \
  --out $OUT/moe_kernel_bench_h200_fp8_w8a8_promote.json > $OUT/moe.log 2>&1
echo "moe bench rc=$? at $(( $(date +%s) - start )) s"
grep "^T=" $OUT/moe.log | sed -e 's/, 1by1.*floor/ floor/' | sed -E 's/ ([0-9.]+) us \(graph ([0-9.]{4,6})[0-9]*\)/ eager \1 graph \2/' | cut -c1-190
