#!/usr/bin/env bash
# Issue 17's H200 figures in one device call (the session's device budget is short).
source benchmarks/device/common.sh
echo "installed after $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
timeout 60 python3 benchmarks/moe_kernel_bench.py --out $OUT/moe_kernel_h200.json --reps 25 > $OUT/moe_kernel.log 2>&1; echo "moe kernel rc=$? at $(( $(date +%s) - start )) s"; tail -25 $OUT/moe_kernel.log
timeout 200 python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --kv-gb 48 --quick --decode-variants triton_graphs,triton_eager --sections ceilings,decode,prefill --out $OUT > $OUT/perf_moe.log 2>&1; echo "perf moe rc=$? at $(( $(date +%s) - start )) s"; tail -30 $OUT/perf_moe.log
timeout 190 python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --compare-model random:qwen3-8b --kv-gb 48 --sections ceilings,offline --out $OUT > $OUT/perf_offline.log 2>&1; echo "offline rc=$? at $(( $(date +%s) - start )) s"; tail -30 $OUT/perf_offline.log
