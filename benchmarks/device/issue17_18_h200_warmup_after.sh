#!/usr/bin/env bash
# Issues 17 and 18, after the aligned prefill views: warmup_check again (FP8, then bf16), the
# decode step of Qwen3-30B-A3B bf16 with the MoE kernels' pair counts unspecialized (against
# gpu_perf_h200_2026-12-03-qwen3-30b-a3b-bf16.json), then the per-row W8A8 promotion timing
# (issue17_18_h200_fp8_moe_w8a8_promote.sh, results in $OUT/promote).
source benchmarks/device/common.sh
for q in fp8 bf16; do
  quant=""; [ $q = fp8 ] && quant="--quantization fp8"
  timeout 150 python3 benchmarks/warmup_check.py --model qwen3-30b-a3b --layers 4 $quant --waves 16 \
    --out $OUT/warmup_check_h200_qwen3-30b-a3b-$q-aligned.json > $OUT/warmup_$q.log 2>&1
  echo "$q rc=$? at $(( $(date +%s) - start )) s"; grep -E "^(cold|warm|greedy) " $OUT/warmup_$q.log | cut -c1-300
done
timeout $(left 440) python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --kv-gb 48 --quick \
  --decode-variants triton_graphs --sections ceilings,decode --out $OUT > $OUT/perf_bf16.log 2>&1
echo "perf bf16 rc=$? at $(( $(date +%s) - start )) s"; grep -E "_b1_|_b64_|Error|error" $OUT/perf_bf16.log | tail -8
mkdir -p $OUT/promote
OUT=$OUT/promote timeout $(left 580) bash benchmarks/device/issue17_18_h200_fp8_moe_w8a8_promote.sh 2>&1 | tail -14
