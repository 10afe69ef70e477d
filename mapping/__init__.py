"""Parallel layout of a worker group: `Mapping` (see mapping.py).

`Mapping(world_size, rank, tp_size, pp_size, gpus_per_node)` is a frozen dataclass that answers
every rank-dependent question: rank -> (tp_rank, pp_rank), the tp and pp groups (all of them, or
this rank's), pipeline neighbours, the layers (`pp_layers`), query heads, KV heads (with GQA
replication and the replica that sends each head) and weight slices each rank owns, plus
`to_dict`/`from_dict`. Pure Python: no torch import.
"""

from splitserve.mapping.mapping import Mapping

__all__ = ["Mapping"]
