#!/usr/bin/env bash
# Issues 17 and 18: the fused MoE kernel's FP8 experts as W8A8 (activations quantized, e4m3 x e4m3)
# beside weight-only at every size, with wider launch shapes; then Qwen3-30B-A3B's decode and
# prefill with FP8 weights (W8A8 experts from W8A8_MIN_PAIRS pairs).
source benchmarks/device/common.sh
timeout 230 python3 benchmarks/moe_kernel_bench.py --fp8 channel block --tokens 1 8 64 256 2048 16384 \
  --configs "block_m=16,n1=64,k1=128,n2=128,k2=128,warps=4,stages=3" "block_m=32,n1=64,k1=128,n2=128,k2=128,warps=4,stages=3" \
  "block_m=64,n1=128,k1=128,n2=128,k2=128,warps=4,stages=3" "block_m=128,n1=128,k1=128,n2=128,k2=128,warps=8,stages=3" \
  --reps 50 --out $OUT/moe_kernel_bench_h200_fp8_w8a8.json > $OUT/moe.log 2>&1
echo "moe bench rc=$? at $(( $(date +%s) - start )) s"; grep "^T=" $OUT/moe.log | sed -e 's/ (same-dtype ref [^)]*)//' -e 's/, 1by1.*floor/ floor/' | cut -c1-170
timeout $(left 420) python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --kv-gb 48 --quick --quantization fp8 \
  --decode-variants triton_graphs --sections ceilings,decode,prefill --out $OUT > $OUT/perf_fp8.log 2>&1
echo "perf fp8 rc=$? at $(( $(date +%s) - start )) s"; grep -E "_b1_|_b64_|TFLOPs|frac|Error|error" $OUT/perf_fp8.log | tail -12
