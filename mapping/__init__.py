"""Parallel layout of a worker group: `Mapping` (see mapping.py).

`Mapping(world_size, rank, tp_size, pp_size, gpus_per_node)` is a frozen dataclass that answers
every rank-dependent question: rank -> (tp_rank, pp_rank), the tp and pp groups (all of them, or
this rank's), pipeline neighbours, the layers (`pp_layers`), query heads, KV heads (with GQA
replication and the replica that sends each head) and weight slices each rank owns, plus
`to_dict`/`from_dict`. Pure Python: no torch import.
"""

# The folder is installed as `splitserve.mapping` (pyproject.toml's package-dir). Imported by its
# bare name (from the repository root, where the folder is on sys.path) it would load a second
# copy of every module, whose classes are not `splitserve.mapping`'s: refuse, and say how.
if __name__ != "splitserve.mapping":
    raise ImportError(f"import splitserve.mapping, not {__name__}: this folder is the splitserve.mapping package "
                      "(installed by `make install` or `pip install -e .`)")

from splitserve.mapping.mapping import Mapping

__all__ = ["Mapping"]
