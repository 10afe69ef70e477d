#!/usr/bin/env bash
# Issue 17 (batch-1 decode): the MoE decode launches started early with PDL (route -> gate_up -> down,
# down's first weight tile loaded before its wait). A/B in separate processes, same seeds:
# SPLITSERVE_MOE_PDL=0 against the default, Qwen3-30B-A3B bf16 (with the float32 greedy-vs-transformers
# section on the default) and FP8; Llama-3-8B bf16 as shipped now (bf16 skinny projections, the merge
# launch); then where Qwen3's batch-1 step goes.
source benchmarks/device/common.sh
mkdir -p /tmp/logs
perf() {  # label model sections env extra-arguments
  local label=$1 model=$2 sections=$3 envs=$4 extra=${5:-}
  env $envs timeout 200 python3 benchmarks/gpu_perf.py --model random:$model --kv-gb 48 --quick \
    --decode-variants triton_graphs --sections $sections $extra --out $OUT/$label > /tmp/logs/$label.log 2>&1
  echo "$label rc=$? at $(( $(date +%s) - start )) s"; grep -E "greedy|match|_b1_|_b64_|Error|error" /tmp/logs/$label.log | tail -6
}
perf q_nopdl qwen3-30b-a3b ceilings,decode SPLITSERVE_MOE_PDL=0
perf q_pdl qwen3-30b-a3b correctness,ceilings,decode X=1
perf q_fp8_nopdl qwen3-30b-a3b ceilings,decode SPLITSERVE_MOE_PDL=0 "--quantization fp8"
perf q_fp8_pdl qwen3-30b-a3b ceilings,decode X=1 "--quantization fp8"
perf l_bf16 llama-3-8b ceilings,decode X=1
timeout $(left 560) python3 benchmarks/decode_profile.py --model random:qwen3-30b-a3b --kv-gb 24 --batch 1 --context 1024 \
  --out $OUT/profile > /tmp/logs/profile.log 2>&1
echo "profile rc=$? at $(( $(date +%s) - start )) s"; grep -iE "kernels|_kernel|step|nvjet" /tmp/logs/profile.log | head -16 | cut -c1-160
tail -n 40 /tmp/logs/*.log > $OUT/logs.txt 2>&1
find $OUT -name '*.png' -not -path '*q_pdl*' -delete
