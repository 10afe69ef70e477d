#!/usr/bin/env bash
# Issues 17 and 18: Qwen3-30B-A3B with FP8 weights (experts weight-only at decode, W8A8 with the
# wide tiles at prefill) decode and prefill; then issue18_h200_fp8_stages.sh's FP8 decode
# attention launch shapes at batch 1 and 64 (results in $OUT/attention).
source benchmarks/device/common.sh
timeout 200 python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --kv-gb 48 --quick --quantization fp8 \
  --decode-variants triton_graphs --sections ceilings,decode,prefill --out $OUT > $OUT/perf_fp8.log 2>&1
echo "perf fp8 rc=$? at $(( $(date +%s) - start )) s"; grep -E "_b1_|_b64_|TFLOPs|frac|Error|error" $OUT/perf_fp8.log | tail -12
mkdir -p $OUT/attention
OUT=$OUT/attention timeout $(left 400) bash benchmarks/device/issue18_h200_fp8_stages.sh 2>&1 | tail -12
