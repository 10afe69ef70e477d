#!/usr/bin/env bash
# Issue 18: DECODE_FP8 with four warps for short context shares (batch 1) and two otherwise
# (run at commit d02c8c2 as "split_warps", four warps whenever split; renamed short_warps after).
source benchmarks/device/common.sh
timeout 100 python3 benchmarks/decode_attention_batch.py --kv fp8 --out $OUT --specs "" short_warps=0 warps=4,short_warps=0 > /tmp/a.log 2>&1; echo "rc=$?"
python3 - <<'PY'
import json, glob, os
for row in json.load(open(glob.glob(os.environ["OUT"] + "/*.json")[0]))["rows"]:
    print(row["model"], "b%d" % row["batch"], row["kv"], "floor %.1f us" % row["floor_us"],
          " ".join(f"[{k}] {v['us']:.1f} us {v['vs_floor']:.2f}x" for k, v in row["variants"].items()))
PY
