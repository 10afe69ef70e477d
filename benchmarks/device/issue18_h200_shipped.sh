#!/usr/bin/env bash
# Issue 18: the engine's FP8 figures with the tuned table as shipped in the wheel (no override).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . > $OUT/pip.log 2>&1 || { echo pip failed; tail -5 $OUT/pip.log; }
export PYTHONPATH=/tmp/site
ls /tmp/site/splitserve/kernels/configs/
timeout 110 python3 benchmarks/fp8_perf.py --sections ceilings,weights --out $OUT > $OUT/fp8_perf_w.log 2>&1; echo "fp8 perf rc=$? at $(( $(date +%s) - start )) s"; grep -E "decode|prefill" $OUT/fp8_perf_w.log | tail -18
