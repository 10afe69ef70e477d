import os, sys, torch
from splitserve.kernels import attention_triton as at
kv, spec = sys.argv[1], sys.argv[2]
g = torch.Generator(device="cuda").manual_seed(1)
b, hq, hk, d, bs, n = 64, 32, 8, 128, 16, 1024
per = n // bs
dtype = torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16
kc = torch.randn(b * per, bs, hk, d, device="cuda", generator=g).to(dtype)
vc = torch.randn(b * per, bs, hk, d, device="cuda", generator=g).to(dtype)
sc = dict(k_scale=torch.full((hk,), 0.5, device="cuda"), v_scale=torch.full((hk,), 0.25, device="cuda")) if kv == "fp8" else {}
tables = torch.randperm(b * per, device="cuda", generator=g).view(b, per)
lens = torch.full((b,), n, device="cuda", dtype=torch.int64)
q = torch.randn(b, hq, d, device="cuda", generator=g).to(torch.bfloat16)
cfg = at.DecodeConfig.parse(spec) if spec else at.DecodeConfig()
for _ in range(4):
    at.paged_decode_attention(q, kc, vc, tables, lens, d**-0.5, cfg=cfg, **sc)
torch.cuda.synchronize()
