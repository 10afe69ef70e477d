"""Compute kernels: each operation as a plain-torch reference (the CPU path and the test
oracle); Triton versions for CUDA come beside them (issue 8).

- `attention`: paged KV writes, batched paged decode attention, chunked prefill attention.
- `norm`: RMSNorm and fused residual + RMSNorm.
- `rotary`: RoPE tables (default and Llama 3 scaling) and the rotation.
"""

# The folder is installed as `splitserve.kernels` (pyproject.toml's package-dir); imported by its
# bare name from the repository root it would load second copies of its modules: refused, or
# handed to another distribution's package of that name (splitserve._bare_import).
if __name__ != "splitserve.kernels":
    from splitserve._bare_import import stand_aside

    stand_aside(globals(), "splitserve.kernels")
