#!/usr/bin/env bash
# Issue 18: the engine's FP8 figures with the tuned table as shipped in the wheel (no override).
source benchmarks/device/common.sh
ls /tmp/site/splitserve/kernels/configs/
timeout 110 python3 benchmarks/fp8_perf.py --sections ceilings,weights --out $OUT > $OUT/fp8_perf_w.log 2>&1; echo "fp8 perf rc=$? at $(( $(date +%s) - start )) s"; grep -E "decode|prefill" $OUT/fp8_perf_w.log | tail -18
