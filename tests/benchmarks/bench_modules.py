"""The benchmark tests' way in to a script of ``benchmarks/`` (a folder of scripts, not a
package): `load_benchmark` runs it as a module under its own name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as module ``name``: the folder goes on ``sys.path`` (the scripts
    import their siblings, e.g. ``results_meta``) and the module into ``sys.modules`` before it
    runs (dataclasses look their module up while the class is built)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
