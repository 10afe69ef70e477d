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
from typing import Any, NoReturn


def stand_aside(namespace: dict[str, Any], installed_as: str) -> None:
    """Called first by a folder's ``__init__`` (``namespace``: its ``globals()``) when its
    ``__name__`` is not ``installed_as``. The rest of that ``__init__`` still runs, in the module
    the import no longer returns when another package took the name."""
    name = namespace["__name__"]
    other = _installed_elsewhere(name, os.path.dirname(os.path.realpath(namespace["__file__"])))
    if other is not None:
        sys.modules[name] = other  # what the import statement returns (it reads sys.modules after)
        return
    del namespace["__path__"]

    def __getattr__(attr: str) -> NoReturn:
        error = ImportError if attr == "__path__" else AttributeError
        raise error(f"import {installed_as}, not {name}: this folder is the {installed_as} package "
                    "(installed by `make install` or `pip install -e .`)")
    namespace["__getattr__"] = __getattr__


def _installed_elsewhere(name: str, folder: str) -> ModuleType | None:
    """The top-level package ``name`` found on sys.path other than ``folder`` (ours, however
    spelled: the repository root and a found package are compared by their real paths), loaded.
    Path-based finders only: a distribution installed behind an import hook (an editable install
    in its default mode) is not found, and the folder is refused instead."""
    root = os.path.dirname(folder)
    path = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None or spec.origin is None or _inside(os.path.realpath(spec.origin), folder):
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)
