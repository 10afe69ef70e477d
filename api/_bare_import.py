"""What a top-level folder does when imported under its bare name instead of ``splitserve.<name>``.

The folders (`kernels`, `workers`, ...) are installed as subpackages of `splitserve`
(pyproject.toml's package-dir), but from the repository root, which is on sys.path, each is
also importable as a top-level package of its own name. Loaded that way its modules would be
second copies whose classes are not `splitserve.<name>`'s, so the folder's ``__init__`` calls
`stand_aside` at once, which does one of two things:

- another distribution installs a package of that name (Hugging Face's `kernels`, which
  transformers imports by that name): the import gets that package, loaded from the rest of
  sys.path, as if the repository root were not on it;
- otherwise the bare package stays empty: its import loads nothing and does not raise (so a
  library's probe of the name finds nothing), and any use of it, a submodule's import too
  (which looks up ``__path__``), raises and says how to import it.

Standard library only: `splitserve.mapping` is pure Python.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType


def stand_aside(namespace: dict, installed_as: str) -> None:
    """Called first by a folder's ``__init__`` (``namespace``: its ``globals()``) when its
    ``__name__`` is not ``installed_as``."""
    name = namespace["__name__"]
    other = _installed_elsewhere(name, os.path.dirname(os.path.dirname(os.path.abspath(namespace["__file__"]))))
    if other is not None:
        sys.modules[name] = other  # what the import statement returns (it reads sys.modules after)
        return
    del namespace["__path__"]

    def __getattr__(attr: str):
        error = ImportError if attr == "__path__" else AttributeError
        raise error(f"import {installed_as}, not {name}: this folder is the {installed_as} package "
                    "(installed by `make install` or `pip install -e .`)")
    namespace["__getattr__"] = __getattr__


def _installed_elsewhere(name: str, root: str) -> ModuleType | None:
    """The top-level package ``name`` found on sys.path without ``root`` (the repository), loaded."""
    path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
