#!/usr/bin/env bash
# Issue 18: disaggregated FP8 KV on one H200 (CUDA IPC between two rank processes, then in-process),
# token-exact with aggregated FP8 on the same weights; mismatched KV dtypes refused.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . > $OUT/pip.log 2>&1 || { echo pip failed; tail -5 $OUT/pip.log; }
export PYTHONPATH=/tmp/site
timeout 200 python3 benchmarks/disagg_gpu_check.py --dtype bfloat16 --kv-cache-dtype fp8 --quantization fp8 --out $OUT 2>&1 | grep -v "^\[" | tail -12
timeout 100 python3 benchmarks/disagg_gpu_check.py --dtype bfloat16 --kv-cache-dtype fp8 --out $OUT 2>&1 | grep -v "^\[" | tail -6
