#!/usr/bin/env bash
# Issue 18: the decode kernel over an FP8 cache is latency-bound at four programs an SM
# (Nsight Compute, issue18_h200_ncu_attention.sh: DRAM 45%, 0.9 eligible warps a scheduler,
# limited by 128 registers and the stages' shared memory). Times, in graphs at batch 64 x 1k,
# launch shapes that fit more programs on an SM (register caps, fewer stages, 16-token steps,
# more splits), then the engine's FP8 figures with the best.
source benchmarks/device/common.sh
timeout 200 python3 benchmarks/decode_attention_batch.py --kv fp8 --batches 64 --out $OUT --best-fp8-out /tmp/best_fp8.txt --specs "" \
  maxnreg=96 maxnreg=80 stages=3 stages=3,maxnreg=96 stages=3,maxnreg=80 stages=2 stages=2,maxnreg=96 stages=2,maxnreg=80 \
  programs_per_sm=4,stages=3,maxnreg=96 programs_per_sm=4,stages=3,maxnreg=80 programs_per_sm=8,stages=3,maxnreg=80 \
  programs_per_sm=4,stages=2,maxnreg=80 block_n=16 block_n=16,programs_per_sm=4 block_n=16,stages=3,programs_per_sm=8 \
  widen=1,stages=3,maxnreg=80 widen=1,stages=2 warps=8,maxnreg=64 warps=2 > /tmp/attn.log 2>&1
echo "attention rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" /tmp/attn.log | tail -4
python3 - <<'PY'
import json, glob, os
f = sorted(glob.glob(os.environ["OUT"] + "/decode_attention_batch_*.json"))
for row in json.load(open(f[-1]))["rows"] if f else []:
    print(row["model"], row["batch"], row["kv"], "floor %.1f us" % row["floor_us"])
    for k, v in sorted(row["variants"].items(), key=lambda kv: kv[1]["us"]):
        print(f"   {k:45s} {v['us']:7.2f} us {v['vs_floor']:.2f}x")
PY
export SPLITSERVE_DECODE_CONFIG_FP8="$(cat /tmp/best_fp8.txt 2>/dev/null)"; echo "fp8 decode config: '$SPLITSERVE_DECODE_CONFIG_FP8'"
timeout $(left 560) python3 benchmarks/fp8_perf.py --sections ceilings,weights,kv --out $OUT > /tmp/fp8_perf.log 2>&1; echo "fp8 perf rc=$? at $(( $(date +%s) - start )) s"; tail -3 /tmp/fp8_perf.log
python3 - <<'PY'
import json, glob, os
f = sorted(glob.glob(os.environ["OUT"] + "/fp8_perf_*.json"))
d = json.load(open(f[-1])) if f else {}
for sec in ("weights", "kv"):
    for k, v in d.get(sec, {}).items():
        if isinstance(v, float) and ("vs_floor" in k or "speedup" in k or "frac" in k or k.endswith("_ms")):
            print(f"{sec}.{k} = {v:.3f}")
PY
