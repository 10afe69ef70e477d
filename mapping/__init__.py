"""Parallel layout of a worker group (placeholder, filled by a later issue).

Will hold `Mapping`: world size, tensor/pipeline parallel sizes, rank -> (tp_rank, pp_rank),
process groups, and the layer and KV-head ranges each rank owns. Pure Python. Nothing is
implemented here yet.
"""
