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
gpu_perf_decode q_off qwen3-30b-a3b ceilings,decode "SPLITSERVE_SKINNY_CONFIGS=/tmp/nobf16.json SPLITSERVE_DECODE_CONFIG=merge=0"
gpu_perf_decode q_on qwen3-30b-a3b correctness,ceilings,decode X=1
gpu_perf_decode q_merge qwen3-30b-a3b ceilings,decode SPLITSERVE_SKINNY_CONFIGS=/tmp/nobf16.json
gpu_perf_decode l_off llama-3-8b ceilings,decode "SPLITSERVE_SKINNY_CONFIGS=/tmp/nobf16.json SPLITSERVE_DECODE_CONFIG=merge=0"
gpu_perf_decode l_on llama-3-8b ceilings,decode X=1
profile_qwen3_b1 560
find $OUT -name '*.png' -not -path '*q_on*' -delete
