"""Compute kernels: each operation as a plain-torch reference (the CPU path and the test
oracle); Triton versions for CUDA come beside them (issue 8).

- `attention`: paged KV writes, batched paged decode attention, chunked prefill attention.
- `norm`: RMSNorm and fused residual + RMSNorm.
- `rotary`: RoPE tables (default and Llama 3 scaling) and the rotation.
"""
