"""The engine of one worker group: everything that turns requests into tokens on its ranks.

Model code for the Llama family (`models/`), model source resolution (`model_source`), the paged
KV cache and block manager with prefix caching, the scheduler (continuous batching, chunked
prefill, preemption), the model runner, sampling and detokenisation, the engine step loop and
the offline `LLM` front end; later the rank processes of a group and its prefill / decode roles.
"""

# The folder is installed as `splitserve.workers` (pyproject.toml's package-dir). Imported by its
# bare name (from the repository root, where the folder is on sys.path) it would load a second
# copy of every module, whose classes are not `splitserve.workers`'s: refuse, and say how.
if __name__ != "splitserve.workers":
    raise ImportError(f"import splitserve.workers, not {__name__}: this folder is the splitserve.workers package "
                      "(installed by `make install` or `pip install -e .`)")
