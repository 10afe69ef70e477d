"""Parallel layout of a worker group: `Mapping` (see mapping.py).

`Mapping(world_size, rank, tp_size, pp_size, gpus_per_node)` is a frozen dataclass that answers
every rank-dependent question: rank -> (tp_rank, pp_rank), the tp and pp groups (all of them, or
this rank's), pipeline neighbours, the layers (`pp_layers`), query heads, KV heads (with GQA
replication and the replica that sends each head) and weight slices each rank owns, plus
`to_dict`/`from_dict`. Pure Python: no torch import.
"""

# The folder is installed as `splitserve.mapping` (pyproject.toml's package-dir). Imported by its
# bare name (from the repository root, which is on sys.path) its modules would load as second
# copies, whose classes are not `splitserve.mapping`'s: refused. The bare import itself loads
# nothing and does not raise, since libraries probe top-level names by importing them
# (transformers imports `kernels`, looking for Hugging Face's package of that name, on every
# model load); any use of it raises, a submodule's import too (it looks up `__path__`).
if __name__ != "splitserve.mapping":
    del __path__

    def __getattr__(attr: str):
        error = ImportError if attr == "__path__" else AttributeError
        raise error(f"import splitserve.mapping, not {__name__}: this folder is the splitserve.mapping package "
                    "(installed by `make install` or `pip install -e .`)")

from splitserve.mapping.mapping import Mapping

__all__ = ["Mapping"]
