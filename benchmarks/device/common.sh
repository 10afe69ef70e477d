# Sourced first by each device script here (run from the repository root on the device machine,
# `$OUT` the folder that comes back): strict variables, NVLink multicast off (the device README's
# KINDS.md: a program that uses it can take the host's GPUs out of service), unbuffered output,
# the package installed into /tmp/site (its log in /tmp, so `$OUT` holds only results), and
# `left N`: the seconds left of a budget of N counted from here.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
start=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - start) )); }
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . > /tmp/pip.log 2>&1 || { echo pip failed; tail -5 /tmp/pip.log; }
export PYTHONPATH=/tmp/site
# `gpu_perf_decode LABEL MODEL SECTIONS "ENV=.. ENV=.." ["EXTRA ARGS"]`: one gpu_perf run of random:MODEL's
# decode (CUDA graphs), results under $OUT/LABEL, its log in /tmp/logs, the headline lines echoed.
gpu_perf_decode() {
  local label=$1 model=$2 sections=$3 envs=$4 extra=${5:-}
  mkdir -p /tmp/logs
  env $envs timeout 200 python3 benchmarks/gpu_perf.py --model random:$model --kv-gb 48 --quick \
    --decode-variants triton_graphs --sections $sections $extra --out $OUT/$label > /tmp/logs/$label.log 2>&1
  echo "$label rc=$? at $(( $(date +%s) - start )) s"; grep -E "greedy|match|_b1_|_b64_|Error|error" /tmp/logs/$label.log | tail -6
}
# `profile_qwen3_b1 DEADLINE`: where Qwen3-30B-A3B's batch-1 decode step goes (decode_profile.py), within
# DEADLINE seconds of the script's start; then the logs' tails into $OUT/logs.txt.
profile_qwen3_b1() {
  timeout $(left $1) python3 benchmarks/decode_profile.py --model random:qwen3-30b-a3b --kv-gb 24 --batch 1 \
    --context 1024 --out $OUT/profile > /tmp/logs/profile.log 2>&1
  echo "profile rc=$? at $(( $(date +%s) - start )) s"; grep -iE "kernels|_kernel|step|nvjet" /tmp/logs/profile.log | head -16 | cut -c1-160
  tail -n 40 /tmp/logs/*.log > $OUT/logs.txt 2>&1
}
