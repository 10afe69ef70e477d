"""`Mapping`: where one rank sits in a worker group's tensor x pipeline parallel layout.

Lifecycle: each rank process builds one `Mapping` from the group's sizes and its own global rank
when it starts (or receives one with `from_dict`, the form that crosses process boundaries). It is
checked once in `__post_init__` and never changes. Everything rank-dependent is derived from it:
the model's loader asks which layers (`pp_layers`), query heads (`heads`), KV heads (`kv_heads`)
and weight slices (`shard_range`) to keep; the rank process asks which process groups to join
(`tp_peers`, `pp_peers`) and which neighbours to send activations to (`prev_pp_rank`,
`next_pp_rank`); kvtransfer compares two `Mapping`s to decide which rank sends which KV head
(`is_kv_replica_leader`). Nobody calls `dist.get_rank()` for these answers.

Layout follows TensorRT-LLM's `Mapping`: tp ranks are contiguous (`tp_rank = rank % tp_size`),
pipeline stages stride by tp_size (`pp_rank = rank // tp_size`), so the tp peers, whose all-reduce
runs every layer, lands on neighbouring GPUs of one node when tp_size <= gpus_per_node.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class Mapping:
    """One rank's place in a (tp_size x pp_size) worker group; all ranks and groups are global.

    Worked examples (asserted in tests/mapping/test_mapping.py):

    world 4, tp 2, pp 2::

        TP groups  [0, 1] [2, 3]
        PP groups  [0, 2] [1, 3]

    world 8, tp 2, pp 4::

        TP groups  [0, 1] [2, 3] [4, 5] [6, 7]
        PP groups  [0, 2, 4, 6] [1, 3, 5, 7]
        rank 5     tp_rank 1, pp_rank 2, prev_pp_rank 3, next_pp_rank 7
        pp_layers(30) per stage: 8, 8, 7, 7  -> range(0, 8) range(8, 16) range(16, 23) range(23, 30)

    KV heads (grouped-query attention)::

        SmolLM2 (9 heads, 3 KV heads), tp 3: rank r holds heads range(3r, 3r+3) and KV head r;
            kv_head_replicas(3) == 1, every rank is its head's leader.
        2 KV heads, tp 4: ranks 0, 1 hold KV head 0; ranks 2, 3 hold KV head 1;
            kv_head_replicas(2) == 2; leaders (the ranks that send the head in KV transfers)
            are ranks 0 and 2.

    Conventions: `prev_pp_rank` is None on the first stage and `next_pp_rank` None on the last.
    `pp_layers` gives the extra layers of an uneven split to the *earlier* stages. Every invalid
    size raises `ValueError` naming the numbers involved.
    """

    world_size: int
    """Ranks in the worker group; must equal tp_size * pp_size."""
    rank: int
    """This process's global rank, 0 <= rank < world_size."""
    tp_size: int = 1
    """Tensor-parallel degree: ranks that split every layer's heads and weights."""
    pp_size: int = 1
    """Pipeline-parallel degree: stages that each own a contiguous block of layers."""
    gpus_per_node: int = 8
    """GPUs per machine; only `local_rank` and `node_rank` depend on it."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            # bool is an int subclass; True as a size is a bug, not a 1.
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{f.name} must be an int, got {value!r}")
        for name in ("world_size", "tp_size", "pp_size", "gpus_per_node"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _require(self.world_size == self.tp_size * self.pp_size,
                 f"world_size ({self.world_size}) must equal tp_size * pp_size "
                 f"({self.tp_size} * {self.pp_size} = {self.tp_size * self.pp_size})")
        _require(0 <= self.rank < self.world_size,
                 f"rank must be in [0, {self.world_size}), got {self.rank}")

    # --- this rank's coordinates ---------------------------------------------------------------

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def local_rank(self) -> int:
        """GPU index on this rank's node."""
        return self.rank % self.gpus_per_node

    @property
    def node_rank(self) -> int:
        return self.rank // self.gpus_per_node

    def for_rank(self, rank: int) -> Mapping:
        """The same layout seen from another rank."""
        return replace(self, rank=rank)

    # --- peers (rank lists; the tp communicator built from them is workers/parallel.py's) --------------------------------------------------------------------------------

    @property
    def tp_peers(self) -> list[int]:
        """Global ranks of this rank's pipeline stage, in tp_rank order."""
        return self.all_tp_peers()[self.pp_rank]

    @property
    def pp_peers(self) -> list[int]:
        """Global ranks with this rank's tp_rank, in pp_rank order (first stage first)."""
        return self.all_pp_peers()[self.tp_rank]

    def all_tp_peers(self) -> list[list[int]]:
        """Every stage's tp peers, indexed by pp_rank; together they hold each rank exactly once."""
        return [list(range(p * self.tp_size, (p + 1) * self.tp_size)) for p in range(self.pp_size)]

    def all_pp_peers(self) -> list[list[int]]:
        """Every tp_rank's pipeline peers, indexed by tp_rank; together they hold each rank exactly once."""
        return [list(range(t, self.world_size, self.tp_size)) for t in range(self.tp_size)]

    # --- pipeline neighbours -------------------------------------------------------------------

    @property
    def is_first_pp_rank(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_rank(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_pp_rank(self) -> int | None:
        """Global rank of the previous stage (same tp_rank); None on the first stage."""
        return None if self.is_first_pp_rank else self.rank - self.tp_size

    @property
    def next_pp_rank(self) -> int | None:
        """Global rank of the next stage (same tp_rank); None on the last stage."""
        return None if self.is_last_pp_rank else self.rank + self.tp_size

    def pp_layers(self, num_layers: int) -> range:
        """The contiguous layers of this stage. Sizes differ by at most one and the first
        `num_layers % pp_size` stages take one extra (30 layers on 4 stages: 8, 8, 7, 7)."""
        _require(num_layers >= self.pp_size,
                 f"num_layers ({num_layers}) must be >= pp_size ({self.pp_size}): "
                 f"every stage needs a layer")
        base, extra = divmod(num_layers, self.pp_size)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        return range(start, start + base + (self.pp_rank < extra))

    # --- tensor-parallel shards ----------------------------------------------------------------

    def shard_range(self, size: int) -> range:
        """This tp rank's equal slice of a dimension of `size` (weight rows, heads, ...)."""
        _require(size >= 1 and size % self.tp_size == 0,
                 f"size ({size}) must be a positive multiple of tp_size ({self.tp_size})")
        k = size // self.tp_size
        return range(self.tp_rank * k, (self.tp_rank + 1) * k)

    def heads(self, num_heads: int) -> range:
        """Query heads of this tp rank; num_heads must divide evenly over tp_size."""
        _require(num_heads >= 1 and num_heads % self.tp_size == 0,
                 f"num_heads ({num_heads}) must be a positive multiple of tp_size ({self.tp_size})")
        return self.shard_range(num_heads)

    def kv_head_replicas(self, num_kv_heads: int) -> int:
        """How many tp ranks hold each KV head: tp_size // num_kv_heads when there are fewer KV
        heads than tp ranks (each is replicated on that many consecutive ranks), else 1."""
        _require(num_kv_heads >= 1, f"num_kv_heads must be >= 1, got {num_kv_heads}")
        if num_kv_heads >= self.tp_size:
            _require(num_kv_heads % self.tp_size == 0,
                     f"num_kv_heads ({num_kv_heads}) must be a multiple of tp_size "
                     f"({self.tp_size}) when it is at least tp_size")
            return 1
        _require(self.tp_size % num_kv_heads == 0,
                 f"tp_size ({self.tp_size}) must be a multiple of num_kv_heads ({num_kv_heads}) "
                 f"when there are fewer KV heads than tp ranks")
        return self.tp_size // num_kv_heads

    def kv_heads(self, num_kv_heads: int) -> range:
        """KV heads this tp rank holds: an even share when num_kv_heads >= tp_size, otherwise
        the single head `tp_rank // kv_head_replicas` that it shares with its replicas."""
        replicas = self.kv_head_replicas(num_kv_heads)
        if replicas == 1:
            return self.shard_range(num_kv_heads)
        head = self.tp_rank // replicas
        return range(head, head + 1)

    def is_kv_replica_leader(self, num_kv_heads: int) -> bool:
        """True on the first tp rank holding its KV heads: the one that sends them in KV
        transfers, so replicated heads cross the wire once. Always true when not replicated."""
        return self.tp_rank % self.kv_head_replicas(num_kv_heads) == 0

    # --- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Mapping:
        """Inverse of `to_dict`. Unknown keys raise ValueError (a typo must not pass silently),
        as do missing world_size / rank; missing sizes take their defaults."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        _require(not unknown, f"unknown Mapping keys: {unknown}")
        missing = [k for k in ("world_size", "rank") if k not in data]
        _require(not missing, f"missing Mapping keys: {missing}")
        return cls(**data)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
