#!/usr/bin/env bash
# Issue 18: the skinny kernel's new launch shapes (W as the left operand, split K reduced in the
# kernel, gate | up with the SiLU fused) swept at Llama-3-8B shapes, writing the tuned table;
# then the engine with FP8 weights against bf16 using that table (decode b1, b64 @ 1k, prefill).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . > $OUT/pip.log 2>&1 || { echo pip failed; tail -5 $OUT/pip.log; }
export PYTHONPATH=/tmp/site
timeout 330 python3 benchmarks/decode_kernel_sweep.py --families fp8 --out $OUT > $OUT/sweep.log 2>&1; echo "sweep rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/sweep.log | tail -22
export SPLITSERVE_SKINNY_CONFIGS=$OUT/skinny_nvidia_h200.json
timeout $(( 570 - ($(date +%s) - start) )) python3 benchmarks/fp8_perf.py --sections ceilings,weights --out $OUT > $OUT/fp8_perf_w.log 2>&1; echo "fp8 perf weights rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/fp8_perf_w.log | tail -30
