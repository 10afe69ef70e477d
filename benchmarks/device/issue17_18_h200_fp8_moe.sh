#!/usr/bin/env bash
# Issues 17 and 18: FP8 (e4m3, weight-only) MoE experts on one H200. The fused MoE kernel at
# Qwen3-30B-A3B's layer shape, bf16 against FP8 per-row and 128x128-block scales (errors, times,
# floors; float16 against bf16 widening; two wider launch shapes), then the whole model's decode
# and prefill with FP8 weights and with bf16, each against its bytes-read floor, and where the
# FP8 batch-1 step goes.
source benchmarks/device/common.sh
timeout 170 python3 benchmarks/moe_kernel_bench.py --fp8 channel block --tokens 1 8 64 256 2048 16384 \
  --configs "block_m=16,n1=32,k1=256,n2=64,k2=256,warps=4,stages=4" "block_m=16,n1=64,k1=128,n2=128,k2=128,warps=4,stages=3" \
  --reps 60 --out $OUT/moe_kernel_bench_h200_fp8.json > $OUT/moe.log 2>&1
echo "moe bench rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/moe.log | grep -E "^ +[0-9]|copy|Error" | cut -c1-150 | tail -70
mkdir -p $OUT/fp8 $OUT/bf16
timeout $(left 330) python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --kv-gb 48 --quick --quantization fp8 \
  --decode-variants triton_graphs --sections ceilings,decode,prefill --out $OUT/fp8 > $OUT/perf_fp8.log 2>&1
echo "perf fp8 rc=$? at $(( $(date +%s) - start )) s"; grep -E "decode|prefill|floor|Error|error" $OUT/perf_fp8.log | tail -14
timeout $(left 420) python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --kv-gb 48 --quick \
  --decode-variants triton_graphs --sections ceilings,decode,prefill --out $OUT/bf16 > $OUT/perf_bf16.log 2>&1
echo "perf bf16 rc=$? at $(( $(date +%s) - start )) s"; grep -E "_b1_|_b64_|TFLOPs|frac|Error|error" $OUT/perf_bf16.log | tail -10
timeout $(left 560) python3 benchmarks/decode_profile.py --model random:qwen3-30b-a3b --quantization fp8 --kv-gb 24 \
  --batch 1 --context 1024 --out $OUT > $OUT/profile.log 2>&1
echo "profile rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/profile.log | tail -22
