"""The router and its front doors.

- `router.py`: `RouterCore` (admission, streaming, metrics) and the `Router` Ray actor that hosts
  it, the groups' engine thread (`engine_loop.py`) and the group policies (`policies.py`);
- `handle.py` / `local_handle.py`: the router seen from a front door, over Ray or in-process;
- `grpc_server.py` (service `splitserve.v1.Generation`, `splitserve.proto`), `http_server.py`
  (OpenAI-compatible, `/health`, `/metrics`), `client.py` (Python clients);
- `messages.py`: the typed messages between them; `metrics.py`: Prometheus metrics.

docs/architecture.md follows one request through these files.
"""
