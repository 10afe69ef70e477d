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

# The folder is installed as `splitserve.router` (pyproject.toml's package-dir); imported by its
# bare name from the repository root it would load second copies of its modules: refused, or
# handed to another distribution's package of that name (splitserve._bare_import).
if __name__ != "splitserve.router":
    from splitserve._bare_import import stand_aside

    stand_aside(globals(), "splitserve.router")
