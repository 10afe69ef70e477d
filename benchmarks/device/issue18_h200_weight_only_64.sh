#!/usr/bin/env bash
# Issue 18, batch 64: the FP8 linears at 64 rows run W8A8 (x quantized per token first, one
# more launch) at 1.35-3.3x their floors. Sweeps weight-only at 64 rows beside W8A8 (the table
# then holds both; linear_triton.weight_only_pays picks), then the engine's FP8 figures with
# the shipped table and with the new one, in the same run.
source benchmarks/device/common.sh
timeout 220 python3 benchmarks/decode_kernel_sweep.py --families fp8 --fp8-rows 64 --out $OUT > /tmp/sweep.log 2>&1; echo "sweep rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" /tmp/sweep.log | grep -E "^fp8|wrote|Error" | tail -12
mkdir -p /tmp/shipped
timeout $(left 400) python3 benchmarks/fp8_perf.py --sections ceilings,weights --out /tmp/shipped > /tmp/perf_shipped.log 2>&1; echo "fp8 perf (shipped table) rc=$? at $(( $(date +%s) - start )) s"; grep -E "fp8_decode|bf16_decode_b64" /tmp/perf_shipped.log | tail -8
[ -f $OUT/skinny_nvidia_h200.json ] && export SPLITSERVE_SKINNY_CONFIGS=$OUT/skinny_nvidia_h200.json
timeout $(left 560) python3 benchmarks/fp8_perf.py --sections ceilings,weights --out $OUT > /tmp/perf_new.log 2>&1; echo "fp8 perf (new table) rc=$? at $(( $(date +%s) - start )) s"; grep -E "decode|prefill" /tmp/perf_new.log | tail -14
