#!/usr/bin/env bash
# Issues 17 and 18: the MoE combine summed inside the next residual add + RMSNorm (one launch fewer a
# layer), and RMSNorms that quantize for the FP8 linear after them: Qwen3-30B-A3B greedy == transformers
# (tiny-qwen3-moe) and decode, bf16 then FP8, against gpu_perf_h200_2026-12-03-qwen3-30b-a3b-bf16-unspecialized.json
# and -fp8.json; where the bf16 batch-1 step goes now; Llama-3-8B bf16 vs FP8 weights (fp8_perf, against
# fp8_perf_h200_2026-12-03-session2-final.json); then warmup_check on the dense FP8 model (4 layers).
source benchmarks/device/common.sh
mkdir -p /tmp/logs  # logs stay here (one file of them comes back): few files fit in what returns
timeout 200 python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --kv-gb 48 --quick --decode-variants triton_graphs \
  --sections correctness,ceilings,decode --out $OUT > /tmp/logs/perf_bf16.log 2>&1
echo "perf bf16 rc=$? at $(( $(date +%s) - start )) s"; grep -E "greedy|match|_b1_|_b64_|Error|error" /tmp/logs/perf_bf16.log | tail -10
timeout 200 python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --kv-gb 48 --quick --quantization fp8 \
  --decode-variants triton_graphs --sections ceilings,decode --out $OUT/fp8 > /tmp/logs/perf_fp8.log 2>&1
echo "perf fp8 rc=$? at $(( $(date +%s) - start )) s"; grep -E "_b1_|_b64_|Error|error" /tmp/logs/perf_fp8.log | tail -8
timeout $(left 420) python3 benchmarks/decode_profile.py --model random:qwen3-30b-a3b --kv-gb 24 --batch 1 --context 1024 \
  --out $OUT/profile > /tmp/logs/profile.log 2>&1
echo "profile rc=$? at $(( $(date +%s) - start )) s"; grep -iE "kernels|_kernel|step" /tmp/logs/profile.log | head -16 | cut -c1-160
timeout $(left 470) python3 benchmarks/fp8_perf.py --sections ceilings,weights --out $OUT/fp8perf > /tmp/logs/fp8_perf.log 2>&1
echo "fp8 perf rc=$? at $(( $(date +%s) - start )) s"; grep -E "decode|prefill" /tmp/logs/fp8_perf.log | tail -12
timeout $(left 575) python3 benchmarks/warmup_check.py --model llama-3-8b --layers 4 --quantization fp8 --waves 16 \
  --out $OUT/warmup_check_h200_llama-3-8b-fp8.json > /tmp/logs/warmup.log 2>&1
echo "warmup rc=$? at $(( $(date +%s) - start )) s"; grep -E "^(cold|warm|greedy) " /tmp/logs/warmup.log | cut -c1-300
# What comes back is limited in files: one log, the JSONs, the FP8 and warm-up plots.
tail -n 60 /tmp/logs/*.log > $OUT/logs.txt 2>&1
rm -f $OUT/*.png $OUT/fp8/*.png
