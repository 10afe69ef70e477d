"""The process groups one rank of a worker group talks over, and the collectives it uses.

Lifecycle: a rank process calls `ParallelState.init(mapping, store_addr, backend)` once
(rendezvous on a TCPStore: gloo on CPU, NCCL on GPU), builds its model and cache with the
`mapping`'s shard of heads, vocabulary and layers, then calls the collectives below every
step. A single-process engine uses `ParallelState.single()`, whose collectives are no-ops, so
the model code has one path.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from splitserve.mapping import Mapping


@dataclass
class ParallelState:
    mapping: Mapping
    #: Process group of this rank's tensor-parallel peers (None when tp_size == 1).
    tp_comm: dist.ProcessGroup | None = None
    #: MoE layers hold whole experts per tp rank instead of every expert's slice
    #: (`ParallelConfig.expert_parallel`; see workers/models/moe.py).
    expert_parallel: bool = False

    @classmethod
    def single(cls) -> "ParallelState":
        return cls(Mapping(world_size=1, rank=0))

    @classmethod
    def init(cls, mapping: Mapping, host: str, port: int, backend: str, timeout_s: float,
             expert_parallel: bool = False) -> "ParallelState":
        """Join the worker group's rendezvous and build every stage's tp communicator (collective:
        all ranks call it)."""
        dist.init_process_group(
            backend, init_method=f"tcp://{host}:{port}", rank=mapping.rank,
            world_size=mapping.world_size, timeout=timedelta(seconds=timeout_s),
        )
        tp_comm = None
        for ranks in mapping.all_tp_peers():  # new_group must be called by all ranks, in order
            comm = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))
            if mapping.rank in ranks:
                tp_comm = comm
        return cls(mapping, tp_comm if mapping.tp_size > 1 else None, expert_parallel)

    @property
    def tp_size(self) -> int:
        return self.mapping.tp_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the tp communicator (row-parallel outputs, vocab-parallel embeddings)."""
        if self.tp_comm is not None:
            dist.all_reduce(x, group=self.tp_comm)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the tp shards along the last dimension (vocab-parallel logits)."""
        if self.tp_comm is None:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_comm)
        return torch.cat(parts, dim=-1)

    def broadcast_from_tp_leader(self, x: torch.Tensor) -> torch.Tensor:
        """Tp rank 0's ``x`` on every tp rank, in place (the step's sampled tokens). On the
        device's streams only: the host does not wait."""
        if self.tp_comm is not None:
            dist.broadcast(x, group=self.tp_comm, group_src=0)
        return x

    def send_next(self, tensors: list[torch.Tensor]) -> None:
        """Hand activations to the same tp rank of the next pipeline stage."""
        for t in tensors:
            dist.send(t.contiguous(), self.mapping.next_pp_rank)

    def recv_prev(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        out = []
        for shape in shapes:
            t = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(t, self.mapping.prev_pp_rank)
            out.append(t)
        return out
