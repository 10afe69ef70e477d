#!/usr/bin/env bash
# Issue 18: programmatic dependent launch for the skinny kernel (and the triggers in the norm,
# SiLU and attention kernels before it): the fp8 sweep with PDL variants, writing the tuned
# table; then the engine's FP8 figures with that table, PDL off, on (linears), on (chain:
# norm, SiLU and attention launched early too); the FP8 attention's transposed loop; a b64 profile.
source benchmarks/device/common.sh
timeout 260 python3 benchmarks/decode_kernel_sweep.py --families fp8 --out $OUT > $OUT/sweep.log 2>&1; echo "sweep rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/sweep.log | tail -17
export SPLITSERVE_SKINNY_CONFIGS=$OUT/skinny_nvidia_h200.json
mkdir -p $OUT/pdl_off
SPLITSERVE_PDL=0 timeout 150 python3 benchmarks/fp8_perf.py --sections ceilings,weights --out $OUT/pdl_off > $OUT/fp8_perf_off.log 2>&1; echo "fp8 perf PDL off rc=$? at $(( $(date +%s) - start )) s"; grep -E "fp8_decode" $OUT/fp8_perf_off.log | tail -8
timeout 150 python3 benchmarks/fp8_perf.py --sections ceilings,weights --out $OUT > $OUT/fp8_perf_w.log 2>&1; echo "fp8 perf PDL on rc=$? at $(( $(date +%s) - start )) s"; grep -E "decode|prefill" $OUT/fp8_perf_w.log | tail -20
mkdir -p $OUT/pdl_chain
SPLITSERVE_PDL=2 timeout $(( 470 - ($(date +%s) - start) )) python3 benchmarks/fp8_perf.py --sections ceilings,weights --out $OUT/pdl_chain > $OUT/fp8_perf_chain.log 2>&1; echo "fp8 perf PDL chain rc=$? at $(( $(date +%s) - start )) s"; grep -E "decode" $OUT/fp8_perf_chain.log | tail -12
mkdir -p $OUT/kv; timeout $(( 590 - ($(date +%s) - start) )) python3 benchmarks/fp8_perf.py --sections ceilings,kv --out $OUT/kv > $OUT/fp8_perf_kv.log 2>&1; echo "fp8 perf kv rc=$? at $(( $(date +%s) - start )) s"; grep -E "attention|blocks" $OUT/fp8_perf_kv.log | tail -24
mkdir -p $OUT/prof64; timeout $(( 595 - ($(date +%s) - start) )) python3 benchmarks/decode_profile.py --model random:llama-3-8b --quantization fp8 --batch 64 --context 1024 --kv-gb 16 --out $OUT/prof64 > $OUT/profile64.log 2>&1; echo "profile b64 rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/profile64.log | grep -E "ms|us  x" | tail -24
