#!/usr/bin/env bash
# Issues 17 and 18 (the batch-1 decode targets): the launch-bound floor. First
# benchmarks/launch_floor.py: one kernel's fixed cost in a CUDA graph chain (empty kernels, and
# streaming reads of 16 KiB to 256 MiB fitted as a + X / b; with and without PDL), and per shipped
# case floor + kernels x a against the target (kernel counts from the committed profiles). Then,
# in the time left, the kernels the shipped batch-1 steps launch recounted by torch.profiler
# (Qwen3-30B-A3B bf16; Llama-3-8B FP8); `launch_floor.py --report-from <its json> --profile ...`
# recomputes the cases from them afterwards, without a GPU. PROFILES=0: the measurement alone.
source benchmarks/device/common.sh
mkdir -p /tmp/logs $OUT/profiles
timeout 200 python3 benchmarks/launch_floor.py --pdl --out $OUT > /tmp/logs/floor.log 2>&1
echo "launch_floor rc=$? at $(( $(date +%s) - start )) s"; tail -n 32 /tmp/logs/floor.log
[ "${PROFILES:-1}" = 0 ] && set -- || set -- "qwen3-30b-a3b|" "llama-3-8b|--quantization fp8"
for spec in "$@"; do
  model=${spec%%|*}; extra=${spec#*|}
  [ "$(left 440)" -gt 60 ] || break
  timeout $(left 440) python3 benchmarks/decode_profile.py --model random:$model $extra --kv-gb 24 --batch 1 \
    --context 1024 --out $OUT/profiles > /tmp/logs/profile-$model.log 2>&1
  echo "profile $model rc=$? at $(( $(date +%s) - start )) s"; grep -E "kernels_per_step|graph_step_ms" /tmp/logs/profile-$model.log
done
tail -n 40 /tmp/logs/*.log > $OUT/logs.txt 2>&1
