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
