#!/usr/bin/env bash
# Issue 18: the skinny kernel's new launch shapes (W as the left operand, split K reduced in the
# kernel, gate | up with the SiLU fused) swept at Llama-3-8B shapes, writing the tuned table;
# then the engine with FP8 weights against bf16 using that table (decode b1, b64 @ 1k, prefill).
source benchmarks/device/common.sh
timeout 330 python3 benchmarks/decode_kernel_sweep.py --families fp8 --out $OUT > $OUT/sweep.log 2>&1; echo "sweep rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/sweep.log | tail -22
export SPLITSERVE_SKINNY_CONFIGS=$OUT/skinny_nvidia_h200.json
timeout $(( 570 - ($(date +%s) - start) )) python3 benchmarks/fp8_perf.py --sections ceilings,weights --out $OUT > $OUT/fp8_perf_w.log 2>&1; echo "fp8 perf weights rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/fp8_perf_w.log | tail -30
