#!/usr/bin/env bash
# Issue 18: the FP8 decode kernel's shipped default (DECODE_FP8: two warps) against four, in
# graphs at batch 64 and 1 over 1k and at batch 64 over 4k (the issue's attention case), then
# the engine's FP8 figures with the shipped defaults (no overrides).
source benchmarks/device/common.sh
show() {
python3 - "$1" <<'PY'
import json, sys
for row in json.load(open(sys.argv[1]))["rows"]:
    print(row["model"], "b%d" % row["batch"], row["context"], row["kv"], "floor %.1f us" % row["floor_us"],
          " ".join(f"[{k}] {v['us']:.1f} us {v['vs_floor']:.2f}x" for k, v in row["variants"].items()))
PY
}
mkdir -p $OUT/ctx1k $OUT/ctx4k
timeout 120 python3 benchmarks/decode_attention_batch.py --out $OUT/ctx1k --specs "" warps=4 warps=2,stages=3 > /tmp/a1.log 2>&1; echo "1k rc=$? at $(( $(date +%s) - start )) s"; show $OUT/ctx1k/decode_attention_batch_*.json
timeout 120 python3 benchmarks/decode_attention_batch.py --out $OUT/ctx4k --context 4096 --batches 64 --specs "" warps=4 warps=2,stages=3 > /tmp/a4.log 2>&1; echo "4k rc=$? at $(( $(date +%s) - start )) s"; show $OUT/ctx4k/decode_attention_batch_*.json
python3 -c "
import json,glob,os
f=glob.glob(os.environ['OUT']+'/ctx4k/*.json')[0]; bw=json.load(open(f))['copy_bandwidth_TBps']
for r in json.load(open(f))['rows']:
    print(r['model'], r['kv'], 'fraction of copy:', {k: round(1/v['vs_floor'],3) for k,v in r['variants'].items()})"
timeout $(left 560) python3 benchmarks/fp8_perf.py --sections ceilings,weights --out $OUT > /tmp/fp8_perf.log 2>&1; echo "fp8 perf rc=$? at $(( $(date +%s) - start )) s"; grep -E "decode|prefill" /tmp/fp8_perf.log | tail -16
# Issue 17: Mixtral-8x7B (random weights, bf16, 93 GB) had not run on the GPU: greedy vs
# transformers on the tiny Mixtral shape, then decode at batch 1 and 64 against its floor.
[ $(left 560) -gt 200 ] && { timeout $(left 580) python3 benchmarks/gpu_perf.py --model random:mixtral-8x7b --kv-gb 16 --quick --decode-variants triton_graphs --sections correctness,ceilings,decode --out $OUT > /tmp/perf_mixtral.log 2>&1; echo "mixtral rc=$? at $(( $(date +%s) - start )) s"; grep -E "correct|greedy|match|decode |b1|b64" /tmp/perf_mixtral.log | tail -14; tail -3 /tmp/perf_mixtral.log; }
