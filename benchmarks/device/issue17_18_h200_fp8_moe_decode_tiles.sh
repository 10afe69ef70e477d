#!/usr/bin/env bash
# Issues 17 and 18: launch shapes of the fused MoE kernel at decode sizes (1 and 8 tokens) for FP8
# weight-only experts (and bf16 beside them): narrower tiles for more programs, deeper or
# shallower pipelines, two warps.
source benchmarks/device/common.sh
timeout 300 python3 benchmarks/moe_kernel_bench.py --fp8 channel block --tokens 1 8 --reps 50 --configs \
  "block_m=16,n1=16,k1=128,n2=32,k2=128,warps=4,stages=4" "block_m=16,n1=16,k1=256,n2=32,k2=256,warps=4,stages=4" \
  "block_m=16,n1=32,k1=128,n2=64,k2=128,warps=2,stages=4" "block_m=16,n1=32,k1=128,n2=64,k2=128,warps=4,stages=6" \
  "block_m=16,n1=32,k1=128,n2=32,k2=128,warps=4,stages=4" "block_m=16,n1=32,k1=64,n2=64,k2=64,warps=4,stages=8" \
  "block_m=16,n1=64,k1=128,n2=128,k2=128,warps=4,stages=3" "block_m=16,n1=16,k1=128,n2=64,k2=128,warps=2,stages=4" \
  "block_m=16,n1=32,k1=256,n2=64,k2=128,warps=4,stages=3" "block_m=16,n1=64,k1=128,n2=64,k2=128,warps=4,stages=4" \
  --out $OUT/moe_kernel_bench_h200_fp8_decode_tiles.json > $OUT/moe.log 2>&1
echo "moe bench rc=$? at $(( $(date +%s) - start )) s"
grep "^T=" $OUT/moe.log | sed -e 's/ (same-dtype ref [^)]*)//' -e 's/, 1by1.*floor/ floor/' -e 's/rel_err [^,]*, //' | sed -E 's/ ([0-9.]+) us \(graph ([0-9.]{4,6})[0-9]*\)/ eager \1 graph \2/' | cut -c1-150
