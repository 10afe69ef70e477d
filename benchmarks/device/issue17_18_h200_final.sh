#!/usr/bin/env bash
# Issues 17 and 18, the session's last call: the decode attention's split policy at batch 64 /
# 1k in graphs (the b64 profile's largest kernel), the fp8 sweep writing the tuned table (PDL
# variants), the engine's FP8 figures with both, then Qwen3-MoE (greedy vs transformers with the
# fused q/k norm and one-launch router; decode), then the router alone.
source benchmarks/device/common.sh
timeout 70 python3 benchmarks/decode_attention_batch.py --out $OUT --best-out $OUT/best_attention.txt > $OUT/attn.log 2>&1; echo "attention rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/attn.log | tail -10
export SPLITSERVE_DECODE_CONFIG="$(cat $OUT/best_attention.txt 2>/dev/null)"; echo "decode config: '$SPLITSERVE_DECODE_CONFIG'"
timeout 170 python3 benchmarks/decode_kernel_sweep.py --families fp8 --out $OUT > $OUT/sweep.log 2>&1; echo "sweep rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/sweep.log | grep -E "^fp8|wrote|Error" | tail -17
[ -f $OUT/skinny_nvidia_h200.json ] && export SPLITSERVE_SKINNY_CONFIGS=$OUT/skinny_nvidia_h200.json
timeout 100 python3 benchmarks/fp8_perf.py --sections ceilings,weights --out $OUT > $OUT/fp8_perf_w.log 2>&1; echo "fp8 perf rc=$? at $(( $(date +%s) - start )) s"; grep -E "decode|prefill" $OUT/fp8_perf_w.log | tail -18
timeout $(left 470) python3 benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --kv-gb 48 --quick --decode-variants triton_graphs --sections correctness,ceilings,decode --out $OUT > $OUT/perf_moe.log 2>&1; echo "perf moe rc=$? at $(( $(date +%s) - start )) s"; grep -E "correct|greedy|match|decode " $OUT/perf_moe.log | tail -14
timeout $(left 520) python3 benchmarks/router_bench.py --out $OUT > $OUT/router.log 2>&1; echo "router rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/router.log | tail -8
