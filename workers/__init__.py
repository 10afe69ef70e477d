"""The engine of one worker group: everything that turns requests into tokens on its ranks.

Model code for the Llama family (`models/`), model source resolution (`model_source`), the paged
KV cache and block manager with prefix caching, the scheduler (continuous batching, chunked
prefill, preemption), the model runner, sampling and detokenisation, the engine step loop and
the offline `LLM` front end; later the rank processes of a group and its prefill / decode roles.
"""

# The folder is installed as `splitserve.workers` (pyproject.toml's package-dir); imported by its
# bare name from the repository root it would load second copies of its modules: refused, or
# handed to another distribution's package of that name (splitserve._bare_import).
if __name__ != "splitserve.workers":
    from splitserve._bare_import import stand_aside

    stand_aside(globals(), "splitserve.workers")
