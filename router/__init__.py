"""The engine core and its front doors.

- `engine_core.py`: `EngineCore`, the engine loop (`engine_loop.py`) behind local sockets:
  requests in as token ids, one output message per step and front door (`core_messages.py`);
  the group policies (`policies.py`);
- `engine_client.py`: a front door's view of the core (`RouterAPI`): tokenization, chat
  templates, detokenization and stop strings (`stream_text.py`); `local_handle.py`: a core
  and a client in one process (tests, one machine without Ray);
- `grpc_server.py` (service `splitserve.v1.Generation`, `splitserve.proto`), `http_server.py`
  (OpenAI-compatible, `/health`, `/metrics`), `client.py` (Python clients);
- `messages.py`: the typed messages of the front doors; `metrics.py`: Prometheus metrics;
- `service_config.py`: what the router side is configured with (`ServiceConfig`: the engine the
  core builds, with the one builder of its groups' configs, the core's admission, the front
  doors); `splitserve.cluster.serve_config` composes it and never the other way round.

docs/architecture.md follows one request through these files.
"""

# The folder is installed as `splitserve.router` (pyproject.toml's package-dir). Imported by its
# bare name (from the repository root, which is on sys.path) its modules would load as second
# copies, whose classes are not `splitserve.router`'s: refused. The bare import itself loads
# nothing and does not raise, since libraries probe top-level names by importing them
# (transformers imports `kernels`, looking for Hugging Face's package of that name, on every
# model load); any use of it raises, a submodule's import too (it looks up `__path__`).
if __name__ != "splitserve.router":
    del __path__

    def __getattr__(attr: str):
        error = ImportError if attr == "__path__" else AttributeError
        raise error(f"import splitserve.router, not {__name__}: this folder is the splitserve.router package "
                    "(installed by `make install` or `pip install -e .`)")
