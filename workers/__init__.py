"""The engine of one worker group: everything that turns requests into tokens on its ranks.

Model code for the Llama family (`models/`), model source resolution (`model_source`), the paged
KV cache and block manager with prefix caching, the scheduler (continuous batching, chunked
prefill, preemption), the model runner, sampling and detokenisation, the engine step loop and
the offline `LLM` front end; later the rank processes of a group and its prefill / decode roles.
"""

# The folder is installed as `splitserve.workers` (pyproject.toml's package-dir). Imported by its
# bare name (from the repository root, which is on sys.path) its modules would load as second
# copies, whose classes are not `splitserve.workers`'s: refused. The bare import itself loads
# nothing and does not raise, since libraries probe top-level names by importing them
# (transformers imports `kernels`, looking for Hugging Face's package of that name, on every
# model load); any use of it raises, a submodule's import too (it looks up `__path__`).
if __name__ != "splitserve.workers":
    del __path__

    def __getattr__(attr: str):
        error = ImportError if attr == "__path__" else AttributeError
        raise error(f"import splitserve.workers, not {__name__}: this folder is the splitserve.workers package "
                    "(installed by `make install` or `pip install -e .`)")
