#!/usr/bin/env bash
# Issue 18: the skinny FP8 kernel's dot type (bf16 / float16 / W8A8) swept at Llama-3-8B shapes,
# then the engine with FP8 weights against bf16 (decode b1, b64 @ 1k, prefill 8 x 2048).
source benchmarks/device/common.sh
timeout 200 python3 benchmarks/decode_kernel_sweep.py --families fp8 --out $OUT > $OUT/sweep.log 2>&1; echo "sweep rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/sweep.log | tail -18
timeout 240 python3 benchmarks/fp8_perf.py --sections ceilings,weights --out $OUT > $OUT/fp8_perf_w.log 2>&1; echo "fp8 perf weights rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/fp8_perf_w.log | tail -30
