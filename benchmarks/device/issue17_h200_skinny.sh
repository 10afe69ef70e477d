#!/usr/bin/env bash
# Issue 17: the skinny linear kernel, the align kernel's chunk, the decode attention splits
# swept; then the engine's decode figures with the skinny kernel on (Qwen3-30B-A3B and the dense
# Llama-3-8B, which must not get slower) and a batch-1 profile.
source benchmarks/device/common.sh
timeout 200 python3 benchmarks/decode_kernel_sweep.py --out $OUT > $OUT/sweep.log 2>&1; echo "sweep rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/sweep.log | tail -40
timeout 150 python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --kv-gb 48 --quick --decode-variants triton_graphs --sections correctness,ceilings,decode --out $OUT > $OUT/perf_moe.log 2>&1; echo "perf moe rc=$? at $(( $(date +%s) - start )) s"; grep -E "correctness|decode  .*(ms|vs_floor)" $OUT/perf_moe.log | tail -12
timeout 120 python3 benchmarks/gpu_perf.py --model random:llama-3-8b --kv-gb 48 --quick --decode-variants triton_graphs --sections ceilings,decode --out $OUT > $OUT/perf_llama.log 2>&1; echo "perf llama rc=$? at $(( $(date +%s) - start )) s"; grep -E "decode  .*(ms|vs_floor)" $OUT/perf_llama.log | tail -8
timeout 80 python3 benchmarks/decode_profile.py --model random:qwen3-30b-a3b --kv-gb 24 --batch 1 --context 1024 --out $OUT > $OUT/profile_b1.log 2>&1; echo "profile b1 rc=$? at $(( $(date +%s) - start )) s"; tail -22 $OUT/profile_b1.log
