"""splitserve: serve Llama-family models with disaggregated prefill and decode.

The public API, imported lazily so that ``import splitserve`` stays cheap (no torch, no
transformers) and works while parts of the engine are still being written:

- ``splitserve.LLM``: offline generation (``splitserve.workers.llm``).
- ``splitserve.SamplingParams``: per-request sampling settings (``splitserve.workers.sampling_params``).
- ``splitserve.Mapping``: a rank's place in a tp x pp worker group (``splitserve.mapping``).
- ``splitserve.Client`` / ``splitserve.AsyncClient``: clients of a running server over gRPC
  (``splitserve.router.client``); their errors are ``splitserve.RouterError``.

The subpackages (``mapping``, ``kernels``, ``workers``, ``kvtransfer``, ``router``, ``cluster``)
live in top-level folders of the repository, and this package in ``api/``; see docs/design.md.
The folder is not named ``splitserve/``: from the repository root (first on sys.path under
``python -m``) it would shadow the installed package, whose subpackages it lacks.
"""

from __future__ import annotations

# Installed as `splitserve` (pyproject.toml's package-dir); under the folder's name it is a copy.
if __name__ != "splitserve":
    raise ImportError(f"import splitserve, not {__name__}: this folder is the splitserve package "
                      "(installed by `make install` or `pip install -e .`)")

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it. Resolved on first attribute access (PEP 562).
_LAZY = {
    "LLM": "splitserve.workers.llm",
    "SamplingParams": "splitserve.workers.sampling_params",
    "Mapping": "splitserve.mapping",
    "Client": "splitserve.router.client",
    "AsyncClient": "splitserve.router.client",
    "RouterError": "splitserve.router.messages",
}

__all__ = ["LLM", "AsyncClient", "Client", "Mapping", "RouterError", "SamplingParams", "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs only; never executed
    from splitserve.workers.llm import LLM
    from splitserve.workers.sampling_params import SamplingParams
    from splitserve.mapping import Mapping
    from splitserve.router.client import AsyncClient, Client
    from splitserve.router.messages import RouterError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'splitserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
