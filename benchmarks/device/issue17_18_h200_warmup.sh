#!/usr/bin/env bash
# Issues 17 and 18: Triton compiles while serving, with the start-up warm-up (one forward per step
# size of dispatch.warm_up_token_counts) against without, Qwen3-30B-A3B's shape (4 layers: the
# kernels' variants do not depend on the depth), bf16 then FP8, each mode a fresh process with an
# empty Triton cache.
source benchmarks/device/common.sh
for q in bf16 fp8; do
  quant=""; [ $q = fp8 ] && quant="--quantization fp8"
  timeout $(left 560) python3 benchmarks/warmup_check.py --model qwen3-30b-a3b --layers 4 $quant --waves 16 \
    --out $OUT/warmup_check_h200_qwen3-30b-a3b-$q.json > $OUT/warmup_$q.log 2>&1
  echo "$q rc=$? at $(( $(date +%s) - start )) s"
  grep -v "^\s*$" $OUT/warmup_$q.log | grep -v Warning | tail -6 | cut -c1-400
done
