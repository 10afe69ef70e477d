"""Compute kernels: each operation as a plain-torch reference (the CPU path and the test
oracle); Triton versions for CUDA come beside them (issue 8).

- `attention`: paged KV writes, batched paged decode attention, chunked prefill attention.
- `norm`: RMSNorm and fused residual + RMSNorm.
- `rotary`: RoPE tables (default and Llama 3 scaling) and the rotation.
"""

# The folder is installed as `splitserve.kernels` (pyproject.toml's package-dir). Imported by its
# bare name (from the repository root, which is on sys.path) its modules would load as second
# copies, whose classes are not `splitserve.kernels`'s: refused. The bare import itself loads
# nothing and does not raise, since libraries probe top-level names by importing them
# (transformers imports `kernels`, looking for Hugging Face's package of that name, on every
# model load); any use of it raises, a submodule's import too (it looks up `__path__`).
if __name__ != "splitserve.kernels":
    del __path__

    def __getattr__(attr: str):
        error = ImportError if attr == "__path__" else AttributeError
        raise error(f"import splitserve.kernels, not {__name__}: this folder is the splitserve.kernels package "
                    "(installed by `make install` or `pip install -e .`)")
