#!/usr/bin/env bash
# Issue 18: the fp8 sweep again (wider split range, 8-warp W8A8 tiles, gated vs plain + SiLU
# recorded in the table), then where an FP8 decode step's time goes at batch 1 (profile), then
# the engine's FP8 figures with the new table.
source benchmarks/device/common.sh
timeout 280 python3 benchmarks/decode_kernel_sweep.py --families fp8 --out $OUT > $OUT/sweep.log 2>&1; echo "sweep rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/sweep.log | tail -17
export SPLITSERVE_SKINNY_CONFIGS=$OUT/skinny_nvidia_h200.json
timeout 120 python3 benchmarks/decode_profile.py --model random:llama-3-8b --quantization fp8 --kv-gb 16 --out $OUT > $OUT/profile.log 2>&1; echo "profile rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/profile.log | tail -32
timeout $(( 580 - ($(date +%s) - start) )) python3 benchmarks/fp8_perf.py --sections ceilings,weights --out $OUT > $OUT/fp8_perf_w.log 2>&1; echo "fp8 perf weights rc=$? at $(( $(date +%s) - start )) s"; grep -E "decode|prefill" $OUT/fp8_perf_w.log | tail -20
