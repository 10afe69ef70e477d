#!/usr/bin/env bash
# Issue 18: FP8 weight kernels for decode swept at Llama-3-8B shapes (GEMV, skinny tl.dot in both
# tile orientations, the first weight-only kernel, _scaled_mm) against bf16; then issue 17's
# decode figures with the new attention splits and align chunk.
source benchmarks/device/common.sh
timeout 330 python3 benchmarks/decode_kernel_sweep.py --families fp8 --out $OUT > $OUT/sweep.log 2>&1; echo "sweep rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/sweep.log | tail -20
timeout 150 python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --kv-gb 48 --quick --decode-variants triton_graphs --sections ceilings,decode --out $OUT > $OUT/perf_moe.log 2>&1; echo "perf moe rc=$? at $(( $(date +%s) - start )) s"; grep -E "decode  .*(ms|vs_floor)" $OUT/perf_moe.log | tail -8
