"""Where a `ServeConfig`'s groups go: decided, and checked, before any group starts.

Before this module `splitserve serve` on a machine with one GPU started the prefill group and
then waited, silently, for a second GPU that would never come. Now the layout is planned from
what the cluster has free, and a layout that cannot be placed says what is missing.

Lifecycle (`cluster.groups.build_engine` runs it first, inside the router's process):
    resources   `plan_on_cluster` reads what Ray has free (``ray.available_resources()``), its
                totals (the device: "auto" is CUDA when the cluster has any GPU, as before)
                and each live node's size (a tp > 1 group must fit on one node)
    plan        `plan` (pure: no Ray, unit-tested on dicts) lists the bundles of each group,
                one per rank: ``cpus_per_rank`` CPUs, plus ``gpus_per_rank`` GPUs on CUDA;
                resolves mode "auto" (disaggregated when its groups fit, else the aggregated
                ``groups.worker`` layout) and checks the chosen layout: every bundle together
                within what is free, each STRICT_PACK group (tp > 1) within one node, each
                bundle within one node. These are necessary conditions only, so nothing that
                Ray could place is refused; a layout that passes but is fragmented across
                nodes is caught by the placement-group wait of `RayLauncher`
                (`placement_wait_s`), with the same kind of message (`shortfall`)
    decide      the chosen mode and its reason are logged ("mode auto: aggregated
                (disaggregated needs 2 GPUs, the cluster has 1 free)"); a layout that does not
                fit raises `PlacementError` at once on an embedded Ray (its resources never
                grow). On a joined cluster (``ray.address`` set) nodes may still be joining,
                or be launched by the autoscaler for a pending placement group, so there the
                shortfall is only logged and the placement groups wait longer
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from splitserve.cluster.serve_config import Mode, ServeConfig
from splitserve.workers.roles import GroupRole

logger = logging.getLogger(__name__)

#: How long a group's placement group may stay pending on an embedded Ray: its resources are
#: this machine's and never grow, so a longer wait only hides the error.
EMBEDDED_PLACEMENT_WAIT_S = 60.0
#: ... and on a joined cluster, where worker nodes may still be starting (KubeRay pods, `ray
#: up` workers) or the autoscaler launches them for the pending group (minutes).
JOINED_PLACEMENT_WAIT_S = 300.0

#: CPUs each rank's bundle reserves (the rank sets its own torch threads from it on CPU).
CPUS_PER_RANK = 1.0

# Resource amounts are floats (fractional GPUs); compare with a little slack.
_EPS = 1e-9


class Strategy(StrEnum):
    """Ray placement strategies a group's placement group uses."""

    #: tensor-parallel ranks talk every layer: one node
    STRICT_PACK = "STRICT_PACK"
    #: pipeline stages (tp = 1) and one-rank groups may spread when one node is full
    PACK = "PACK"


def group_strategy(tp: int) -> Strategy:
    return Strategy.STRICT_PACK if tp > 1 else Strategy.PACK


def rank_bundle(cpus: float, gpus: float) -> dict[str, float]:
    """One rank's bundle; no GPU key at all on CPU (Ray treats ``GPU: 0`` as a demand)."""
    return {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}


class PlacementError(ValueError):
    """A layout the cluster cannot hold; the message names what is needed against what is free.
    A ValueError: `splitserve serve` prints it as bad input, not a traceback."""

    def __init__(self, message: str, needed: Mapping[str, float] | None = None,
                 free: Mapping[str, float] | None = None):
        super().__init__(message)
        self.needed, self.free = dict(needed or {}), dict(free or {})


@dataclass(frozen=True)
class GroupBundles:
    """The bundles of every group of one role: ``count`` placement groups of ``tp * pp``
    rank bundles each."""

    role: GroupRole
    count: int
    tp: int
    pp: int
    cpus_per_rank: float
    gpus_per_rank: float

    @property
    def ranks(self) -> int:
        return self.tp * self.pp

    @property
    def strategy(self) -> Strategy:
        return group_strategy(self.tp)

    @property
    def bundle(self) -> dict[str, float]:
        return rank_bundle(self.cpus_per_rank, self.gpus_per_rank)

    def per_group(self) -> dict[str, float]:
        return {k: v * self.ranks for k, v in self.bundle.items()}

    def total(self) -> dict[str, float]:
        return {k: v * self.count for k, v in self.per_group().items()}

    def describe(self) -> str:
        return f"{self.count} {self.role} group{'' if self.count == 1 else 's'} of tp {self.tp} x pp {self.pp}"


@dataclass(frozen=True)
class Placement:
    """What `plan` decided: the mode to serve (never AUTO), why, and the bundles it needs."""

    mode: Mode
    #: "cpu" or "cuda": where the ranks run.
    device: str
    #: One line for the log: the mode chosen and why.
    reason: str
    groups: tuple[GroupBundles, ...]
    #: What the decision was made against.
    free: Mapping[str, float] = field(default_factory=dict)
    #: Why the chosen layout does not fit ("needs 2 GPUs, the cluster has 1 free"); None: fits.
    missing: str | None = None

    @property
    def fits(self) -> bool:
        return self.missing is None

    @property
    def needed(self) -> dict[str, float]:
        return _sum(g.total() for g in self.groups)

    def bundles(self) -> list[dict[str, float]]:
        """Every rank's bundle, group by group in start order."""
        return [g.bundle for g in self.groups for _ in range(g.count * g.ranks)]

    def apply(self, cfg: ServeConfig) -> ServeConfig:
        """``cfg`` with the chosen mode in place of "auto": what the engine is built from (and
        what the router reports as its mode and roles)."""
        return replace(cfg, mode=self.mode.value)

    def error(self) -> PlacementError:
        return PlacementError(f"cannot place {self.reason}", self.needed, self.free)


def resolve_device(device: str, total: Mapping[str, float]) -> str:
    """"auto" means the cluster's GPUs if it has any (the router itself may be on a CPU node)."""
    if device != "auto":
        return device
    return "cuda" if total.get("GPU", 0) > 0 else "cpu"


def groups_of(cfg: ServeConfig, mode: Mode, device: str,
              cpus_per_rank: float = CPUS_PER_RANK) -> tuple[GroupBundles, ...]:
    """The groups ``mode`` starts from ``cfg``, as bundles."""
    gpus = cfg.gpus_per_rank if device.startswith("cuda") else 0.0
    return tuple(GroupBundles(role, spec.count, spec.tp, spec.pp, cpus_per_rank, gpus)
                 for role in mode.roles() for spec in [cfg.group(role)])


def shortfall(groups: Sequence[GroupBundles], free: Mapping[str, float],
              nodes: Sequence[Mapping[str, float]] | None = None) -> str | None:
    """What keeps ``groups`` from fitting (``free``: the cluster's free resources; ``nodes``:
    each node's size, None: not checked), phrased "needs X, the cluster has Y free"; None when
    nothing necessary is missing."""
    needed = _sum(g.total() for g in groups)
    for resource in ("GPU", "CPU"):  # the GPU is what usually runs out: name it first
        want, have = needed.get(resource, 0.0), free.get(resource, 0.0)
        if want > have + _EPS:
            return f"needs {_amount(want, resource)}, the cluster has {_amount(have, resource)} free"
    if nodes is not None:
        for g in groups:
            if g.count == 0:
                continue
            # A STRICT_PACK group is all on one node; a PACK group's bundles may spread.
            unit, what = ((g.per_group(), f"each {g.role} group (tp {g.tp} x pp {g.pp})")
                          if g.strategy is Strategy.STRICT_PACK else (g.bundle, f"each {g.role} rank"))
            if any(_within(unit, node) for node in nodes):
                continue
            for resource, want in unit.items():
                largest = max((node.get(resource, 0.0) for node in nodes), default=0.0)
                if want > largest + _EPS:
                    return (f"{what} needs {_amount(want, resource)} on one node, the largest node has "
                            f"{_amount(largest, resource)}")
            return f"{what} needs {_resources(unit)} on one node, no node has all of it"
    return None


def plan(cfg: ServeConfig, free: Mapping[str, float], *, total: Mapping[str, float] | None = None,
         nodes: Sequence[Mapping[str, float]] | None = None, cpus_per_rank: float = CPUS_PER_RANK,
         strict: bool = True) -> Placement:
    """The placement of ``cfg`` on a cluster with ``free`` resources (``{"CPU": x, "GPU": y}``,
    as ``ray.available_resources()``); ``total`` (default: ``free``) picks the device when it is
    "auto"; ``nodes`` are each node's resources (None: not checked per node). With ``strict``,
    a layout that does not fit raises `PlacementError`; without, it comes back with
    ``missing`` set (a cluster that may still grow)."""
    device = resolve_device(cfg.device, free if total is None else total)
    asked = Mode(cfg.mode)
    unit = "GPU" if device.startswith("cuda") else "CPU"
    if asked is Mode.AUTO:
        disagg = groups_of(cfg, Mode.DISAGGREGATED, device, cpus_per_rank)
        missing = shortfall(disagg, free, nodes)
        if missing is None:
            need = _sum(g.total() for g in disagg).get(unit, 0.0)
            reason = (f"mode auto: disaggregated (its groups need {_amount(need, unit)}, the cluster has "
                      f"{_amount(free.get(unit, 0.0), unit)} free)")
            chosen, groups = Mode.DISAGGREGATED, disagg
        else:
            chosen, groups = Mode.AGGREGATED, groups_of(cfg, Mode.AGGREGATED, device, cpus_per_rank)
            also = shortfall(groups, free, nodes)
            reason = (f"mode auto: aggregated (disaggregated {missing})" if also is None else
                      f"mode auto: disaggregated {missing}, and aggregated {also}")
            missing = also
    else:
        chosen, groups = asked, groups_of(cfg, asked, device, cpus_per_rank)
        missing = shortfall(groups, free, nodes)
        layout = ", ".join(g.describe() for g in groups) + f", on {device}"
        reason = f"mode {asked.value} ({layout}): " + (
            missing or f"needs {_amount(_sum(g.total() for g in groups).get(unit, 0.0), unit)}, "
                       f"the cluster has {_amount(free.get(unit, 0.0), unit)} free")
    placement = Placement(chosen, device, reason, groups, dict(free), missing)
    if strict and missing is not None:
        raise placement.error()
    return placement


def resolve_local(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` with mode "auto" resolved for groups in this process, without Ray
    (`build_local_router`): disaggregated, since local groups share this machine's devices
    whatever their number (1 x 1 groups in one process move KV in memory; local rank processes
    on fewer GPUs than ranks, by CUDA IPC)."""
    return replace(cfg, mode=Mode.DISAGGREGATED.value) if cfg.mode == Mode.AUTO else cfg


def placement_wait_s(cfg: ServeConfig) -> float:
    """How long one group's placement group may stay pending before the group fails."""
    if cfg.ray.placement_timeout_s is not None:
        return cfg.ray.placement_timeout_s
    return EMBEDDED_PLACEMENT_WAIT_S if cfg.ray.address is None else JOINED_PLACEMENT_WAIT_S


def plan_on_cluster(cfg: ServeConfig, cpus_per_rank: float = CPUS_PER_RANK) -> Placement:
    """`plan` against the connected Ray cluster (what `build_engine` calls): logs the decision;
    raises `PlacementError` on an embedded Ray when the layout does not fit, and only warns on
    a joined cluster (nodes may still join; the placement groups wait `placement_wait_s`)."""
    import ray

    embedded = cfg.ray.address is None
    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    placement = plan(cfg, ray.available_resources(), total=ray.cluster_resources(), nodes=nodes,
                     cpus_per_rank=cpus_per_rank, strict=embedded)
    if placement.fits:
        logger.info("%s", placement.reason)
    else:
        logger.warning("%s; waiting up to %.0f s per group for nodes to join", placement.reason,
                       placement_wait_s(cfg))
    return placement


def cluster_shortfall(group: GroupBundles) -> str:
    """Why ``group``'s placement group stays pending, from what Ray has free now (the message of
    `RayLauncher`'s placement timeout); "" when Ray shows enough free (spread over nodes too
    thinly for STRICT_PACK, or freed since)."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    return shortfall([group], ray.available_resources(), nodes) or ""


# ---- amounts ---------------------------------------------------------------------------------

def _sum(parts) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _within(want: Mapping[str, float], have: Mapping[str, float]) -> bool:
    return all(v <= have.get(k, 0.0) + _EPS for k, v in want.items())


def _amount(x: float, resource: str) -> str:
    """"2 GPUs", "1 CPU", "0.5 GPU", "0 GPUs"."""
    n = int(round(x)) if math.isclose(x, round(x), abs_tol=1e-6) else round(x, 3)
    return f"{n:g} {resource}" + ("" if 0 < n <= 1 else "s")


def _resources(want: Mapping[str, float]) -> str:
    return " and ".join(_amount(v, k) for k, v in sorted(want.items(), reverse=True))
