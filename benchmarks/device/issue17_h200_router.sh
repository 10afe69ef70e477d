#!/usr/bin/env bash
# Issue 17, second session: the one-launch Triton router on the H200 (greedy == transformers,
# then the decode figures) and where a decode step's time goes at batch 1 and batch 64 @ 1k.
source benchmarks/device/common.sh
echo "installed after $(( $(date +%s) - start )) s"
timeout 150 python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --kv-gb 48 --quick --decode-variants triton_graphs --sections correctness,ceilings,decode --out $OUT > $OUT/perf_moe.log 2>&1; echo "perf moe rc=$? at $(( $(date +%s) - start )) s"; tail -40 $OUT/perf_moe.log
for b in 1 64; do
timeout 100 python3 benchmarks/decode_profile.py --model random:qwen3-30b-a3b --kv-gb 24 --batch $b --context 1024 --out $OUT > $OUT/profile_b$b.log 2>&1; echo "profile b$b rc=$? at $(( $(date +%s) - start )) s"; tail -30 $OUT/profile_b$b.log
done
