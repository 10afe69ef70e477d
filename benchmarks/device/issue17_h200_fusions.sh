#!/usr/bin/env bash
# Issue 17: q/k RMSNorm in the rotary launch and the one-launch router on the GPU: greedy vs
# transformers on tiny Qwen3-MoE, then random:qwen3-30b-a3b decode (PDL default, then the chain
# mode), then the router alone against the two-launch path and cuBLAS.
source benchmarks/device/common.sh
timeout 200 python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --kv-gb 48 --quick --decode-variants triton_graphs --sections correctness,ceilings,decode --out $OUT > $OUT/perf_moe.log 2>&1; echo "perf moe rc=$? at $(( $(date +%s) - start )) s"; grep -E "correct|greedy|match|decode " $OUT/perf_moe.log | tail -14
mkdir -p $OUT/chain
SPLITSERVE_PDL=2 timeout 150 python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --kv-gb 48 --quick --decode-variants triton_graphs --sections ceilings,decode --out $OUT/chain > $OUT/perf_moe_chain.log 2>&1; echo "perf moe chain rc=$? at $(( $(date +%s) - start )) s"; grep -E "decode " $OUT/perf_moe_chain.log | tail -8
timeout $(( 580 - ($(date +%s) - start) )) python3 benchmarks/router_bench.py --out $OUT > $OUT/router.log 2>&1; echo "router rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/router.log | tail -12
