#!/usr/bin/env bash
# Issue 18: DECODE_FP8 with four warps for short context shares (batch 1) and two otherwise
# (run at commit d02c8c2 as "split_warps", four warps whenever split; renamed short_warps after).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . > /tmp/pip.log 2>&1 || { echo pip failed; tail -5 /tmp/pip.log; }
export PYTHONPATH=/tmp/site
timeout 100 python3 benchmarks/decode_attention_batch.py --kv fp8 --out $OUT --specs "" short_warps=0 warps=4,short_warps=0 > /tmp/a.log 2>&1; echo "rc=$?"
python3 - <<'PY'
import json, glob, os
for row in json.load(open(glob.glob(os.environ["OUT"] + "/*.json")[0]))["rows"]:
    print(row["model"], "b%d" % row["batch"], row["kv"], "floor %.1f us" % row["floor_us"],
          " ".join(f"[{k}] {v['us']:.1f} us {v['vs_floor']:.2f}x" for k, v in row["variants"].items()))
PY
