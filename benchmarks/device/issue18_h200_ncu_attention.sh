#!/usr/bin/env bash
# Issue 18: why the decode kernel over an FP8 cache runs at about bf16's time (batch 64 x 1k,
# Llama-3-8B heads) with half the bytes, and with 38% fewer loop instructions when widening
# early: Nsight Compute's sections for bf16, FP8 widened late and early, and FP8 with 64-token steps.
source benchmarks/device/common.sh
i=0
for v in "bf16 block_n=32" "fp8 widen=0" "fp8 widen=1" "fp8 widen=0,block_n=64,stages=3"; do
  set -- $v; i=$((i+1))
  timeout 120 ncu --clock-control none --kernel-name _decode_kernel --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --metrics smsp__pcsamp_warps_issue_stalled_long_scoreboard,smsp__pcsamp_warps_issue_stalled_barrier,smsp__pcsamp_warps_issue_stalled_short_scoreboard,smsp__pcsamp_warps_issue_stalled_wait,smsp__pcsamp_warps_issue_stalled_math_pipe_throttle,smsp__pcsamp_warps_issue_stalled_mio_throttle,smsp__pcsamp_warps_issue_stalled_lg_throttle,smsp__pcsamp_warps_issue_stalled_not_selected,smsp__pcsamp_warps_issue_stalled_selected,smsp__pcsamp_warps_issue_stalled_dispatch_stall,smsp__pcsamp_warps_issue_stalled_no_instructions \
    python3 benchmarks/device/ncu/decode_attention_case.py $1 "$2" > $OUT/ncu_$i.txt 2>&1
  echo "== $v rc=$?"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Issue Slots Busy|Warp Cycles Per Issued|No Eligible|Active Warps Per|Eligible Warps|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|stalled_[a-z_]+ " $OUT/ncu_$i.txt | sed 's/  */ /g' | head -40
done
