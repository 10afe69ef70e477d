#!/usr/bin/env bash
# Issue 17 (batch-1 decode): the MoE decode launches started early with PDL (route -> gate_up -> down,
# down's first weight tile loaded before its wait). A/B in separate processes, same seeds:
# SPLITSERVE_MOE_PDL=0 against the default, Qwen3-30B-A3B bf16 (with the float32 greedy-vs-transformers
# section on the default) and FP8; Llama-3-8B bf16 as shipped now (bf16 skinny projections, the merge
# launch); then where Qwen3's batch-1 step goes.
# SPLITSERVE_MOE_PDL exists at e70c695 only (the MoE PDL was reverted after this measurement).
source benchmarks/device/common.sh
gpu_perf_decode q_nopdl qwen3-30b-a3b ceilings,decode SPLITSERVE_MOE_PDL=0
gpu_perf_decode q_pdl qwen3-30b-a3b correctness,ceilings,decode X=1
gpu_perf_decode q_fp8_nopdl qwen3-30b-a3b ceilings,decode SPLITSERVE_MOE_PDL=0 "--quantization fp8"
gpu_perf_decode q_fp8_pdl qwen3-30b-a3b ceilings,decode X=1 "--quantization fp8"
gpu_perf_decode l_bf16 llama-3-8b ceilings,decode X=1
profile_qwen3_b1 560
find $OUT -name '*.png' -not -path '*q_pdl*' -delete
