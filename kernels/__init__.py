"""Compute kernels: each operation as a plain-torch reference (the CPU path and the test
oracle); Triton versions for CUDA come beside them (issue 8).

- `attention`: paged KV writes, batched paged decode attention, chunked prefill attention.
- `norm`: RMSNorm and fused residual + RMSNorm.
- `rotary`: RoPE tables (default and Llama 3 scaling) and the rotation.
"""

# The folder is installed as `splitserve.kernels` (pyproject.toml's package-dir). Imported by its
# bare name (from the repository root, where the folder is on sys.path) it would load a second
# copy of every module, whose classes are not `splitserve.kernels`'s: refuse, and say how.
if __name__ != "splitserve.kernels":
    raise ImportError(f"import splitserve.kernels, not {__name__}: this folder is the splitserve.kernels package "
                      "(installed by `make install` or `pip install -e .`)")
