#!/usr/bin/env bash
# Issues 17 and 18 (batch-1 decode): bf16 projections on the skinny kernel where the tuned table measured
# it faster than cuBLAS (dispatch.linear), and the decode attention's split merge inside the kernel
# (DecodeConfig.merge_in_kernel). A/B in separate processes, same seeds: "off" = the table without its
# bf16 entries and merge=0 (as before), "merge" = only the in-kernel merge, "on" = as shipped (with the
# float32 greedy-vs-transformers correctness section, which takes the merge path on the GPU). Qwen3-30B-A3B
# then Llama-3-8B; then where Qwen3's batch-1 step goes.
source benchmarks/device/common.sh
mkdir -p /tmp/logs
python3 -c "
import json; from splitserve.kernels import linear_triton as lt
t = json.loads(lt.tuned_file('NVIDIA H200').read_text())
t['configs'] = {k: v for k, v in t['configs'].items() if not k.startswith('bf16:')}
open('/tmp/nobf16.json', 'w').write(json.dumps(t))"
perf() {  # label model sections env...
  local label=$1 model=$2 sections=$3; shift 3
  env "$@" timeout 200 python3 benchmarks/gpu_perf.py --model random:$model --kv-gb 48 --quick \
    --decode-variants triton_graphs --sections $sections --out $OUT/$label > /tmp/logs/$label.log 2>&1
  echo "$label rc=$? at $(( $(date +%s) - start )) s"; grep -E "greedy|match|_b1_|_b64_|Error|error" /tmp/logs/$label.log | tail -6
}
perf q_off qwen3-30b-a3b ceilings,decode SPLITSERVE_SKINNY_CONFIGS=/tmp/nobf16.json SPLITSERVE_DECODE_CONFIG=merge=0
perf q_on qwen3-30b-a3b correctness,ceilings,decode X=1
perf q_merge qwen3-30b-a3b ceilings,decode SPLITSERVE_SKINNY_CONFIGS=/tmp/nobf16.json
perf l_off llama-3-8b ceilings,decode SPLITSERVE_SKINNY_CONFIGS=/tmp/nobf16.json SPLITSERVE_DECODE_CONFIG=merge=0
perf l_on llama-3-8b ceilings,decode X=1
timeout $(left 560) python3 benchmarks/decode_profile.py --model random:qwen3-30b-a3b --kv-gb 24 --batch 1 --context 1024 \
  --out $OUT/profile > /tmp/logs/profile.log 2>&1
echo "profile rc=$? at $(( $(date +%s) - start )) s"; grep -iE "kernels|_kernel|step|nvjet" /tmp/logs/profile.log | head -16 | cut -c1-160
tail -n 40 /tmp/logs/*.log > $OUT/logs.txt 2>&1
find $OUT -name '*.png' -not -path '*q_on*' -delete
