#!/usr/bin/env bash
# Issue 18: DECODE_FP8 with three stages (two warps; four for short shares) against four stages,
# FP8 caches at batch 64 and 1 over 1k; and warm_up's four decode variants on the GPU.
source benchmarks/device/common.sh
timeout 60 python3 -c "
import torch
from splitserve.kernels import attention_triton as at
c = torch.zeros(64, 16, 8, 128, device='cuda').to(torch.float8_e4m3fn)
s = torch.ones(8, device='cuda')
at.warm_up(c, c, num_heads=32, scale=0.1, dtype=torch.bfloat16, k_scale=s, v_scale=s)
print('warm_up fp8 ok', at.default_decode_config(True).spec())"
timeout 80 python3 benchmarks/decode_attention_batch.py --kv fp8 --out $OUT --specs "" stages=4 short_warps=0 > /tmp/a.log 2>&1; echo "rc=$?"
python3 - <<'PY'
import json, glob, os
for row in json.load(open(glob.glob(os.environ["OUT"] + "/*.json")[0]))["rows"]:
    print(row["model"], "b%d" % row["batch"], row["kv"], "floor %.1f us" % row["floor_us"],
          " ".join(f"[{k}] {v['us']:.1f} us {v['vs_floor']:.2f}x" for k, v in row["variants"].items()))
PY
