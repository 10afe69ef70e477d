#!/usr/bin/env bash
# Issue 18: disaggregated FP8 KV on one H200 (CUDA IPC between two rank processes, then in-process),
# token-exact with aggregated FP8 on the same weights; mismatched KV dtypes refused.
source benchmarks/device/common.sh
timeout 200 python3 benchmarks/disagg_gpu_check.py --dtype bfloat16 --kv-cache-dtype fp8 --quantization fp8 --out $OUT 2>&1 | grep -v "^\[" | tail -12
timeout 100 python3 benchmarks/disagg_gpu_check.py --dtype bfloat16 --kv-cache-dtype fp8 --out $OUT 2>&1 | grep -v "^\[" | tail -6
