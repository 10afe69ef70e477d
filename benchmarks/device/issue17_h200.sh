#!/usr/bin/env bash
# Issue 17's H200 figures in one device call (the session's device budget is short).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . > $OUT/pip.log 2>&1 || { echo pip failed; tail -5 $OUT/pip.log; }
export PYTHONPATH=/tmp/site
echo "installed after $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
timeout 60 python3 benchmarks/moe_kernel_bench.py --out $OUT/moe_kernel_h200.json --reps 25 > $OUT/moe_kernel.log 2>&1; echo "moe kernel rc=$? at $(( $(date +%s) - start )) s"; tail -25 $OUT/moe_kernel.log
timeout 200 python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --kv-gb 48 --quick --decode-variants triton_graphs,triton_eager --sections ceilings,decode,prefill --out $OUT > $OUT/perf_moe.log 2>&1; echo "perf moe rc=$? at $(( $(date +%s) - start )) s"; tail -30 $OUT/perf_moe.log
timeout 190 python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --compare-model random:qwen3-8b --kv-gb 48 --sections ceilings,offline --out $OUT > $OUT/perf_offline.log 2>&1; echo "offline rc=$? at $(( $(date +%s) - start )) s"; tail -30 $OUT/perf_offline.log
