"""Parallel layout of a worker group: `Mapping` (see mapping.py).

`Mapping(world_size, rank, tp_size, pp_size, gpus_per_node)` is a frozen dataclass that answers
every rank-dependent question: rank -> (tp_rank, pp_rank), the tp and pp groups (all of them, or
this rank's), pipeline neighbours, the layers (`pp_layers`), query heads, KV heads (with GQA
replication and the replica that sends each head) and weight slices each rank owns, plus
`to_dict`/`from_dict`. Pure Python: no torch import.
"""

# The folder is installed as `splitserve.mapping` (pyproject.toml's package-dir); imported by its
# bare name from the repository root it would load second copies of its modules: refused, or
# handed to another distribution's package of that name (splitserve._bare_import).
if __name__ != "splitserve.mapping":
    from splitserve._bare_import import stand_aside

    stand_aside(globals(), "splitserve.mapping")

from splitserve.mapping.mapping import Mapping

__all__ = ["Mapping"]
