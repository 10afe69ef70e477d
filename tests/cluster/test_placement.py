"""`splitserve.cluster.placement`: where a serve config's groups go.

The decision is a pure function of the config and a resources dict (as
``ray.available_resources()``), tested without Ray: mode auto serves disaggregated when its
groups fit and falls back to aggregated with a reason that names the shortfall; a layout that
cannot be placed raises `PlacementError` naming what it needs against what is free. Two tests
on the session's local Ray (32 logical CPUs, no model loaded): the check `build_engine` runs
refuses a layout that needs more CPUs at once, and a group's placement group that cannot be
placed fails at its (short) deadline with the same kind of message, not after the model-load
deadline.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from splitserve.cluster.placement import (EMBEDDED_PLACEMENT_WAIT_S, JOINED_PLACEMENT_WAIT_S, PlacementError,
                                         Strategy, placement_wait_s, plan, resolve_local)
from splitserve.cluster.serve_config import GroupSpec, Mode, RaySpec, ServeConfig

DEFAULT = ServeConfig().validate()


def _disagg(**kw) -> ServeConfig:
    return replace(DEFAULT, mode="disaggregated", **kw).validate()


def test_one_gpu_serves_aggregated_and_says_why():
    p = plan(DEFAULT, {"CPU": 16.0, "GPU": 1.0})
    assert p.mode is Mode.AGGREGATED and p.device == "cuda" and p.fits
    assert p.reason == "mode auto: aggregated (disaggregated needs 2 GPUs, the cluster has 1 GPU free)"
    assert p.bundles() == [{"CPU": 1.0, "GPU": 1.0}] and p.needed == {"CPU": 1.0, "GPU": 1.0}
    resolved = p.apply(DEFAULT)
    assert resolved.mode == "aggregated" and resolved.roles() == ("worker",)


def test_two_gpus_serve_disaggregated():
    p = plan(DEFAULT, {"CPU": 16.0, "GPU": 2.0})
    assert p.mode is Mode.DISAGGREGATED and p.reason.startswith("mode auto: disaggregated")
    assert [g.role for g in p.groups] == ["prefill", "decode"] and p.needed["GPU"] == 2
    assert p.apply(DEFAULT).roles() == ("prefill", "decode")


def test_cpu_device_counts_cpus():
    # Forced to CPU on a GPU cluster: only CPUs count, and bundles ask for no GPU at all.
    p = plan(replace(DEFAULT, device="cpu"), {"CPU": 1.0, "GPU": 8.0})
    assert p.mode is Mode.AGGREGATED and p.device == "cpu"
    assert "disaggregated needs 2 CPUs, the cluster has 1 CPU free" in p.reason
    assert p.bundles() == [{"CPU": 1.0}]
    # "auto" with no GPU anywhere is the CPU, as `cluster_device` decides.
    assert plan(DEFAULT, {"CPU": 8.0}).device == "cpu"
    assert plan(DEFAULT, {"CPU": 8.0, "GPU": 0.0}, total={"CPU": 8.0, "GPU": 1.0}, strict=False).device == "cuda"


def test_impossible_layout_names_needed_and_free():
    cfg = _disagg(prefill=GroupSpec(count=2, tp=2))
    with pytest.raises(PlacementError, match=r"cannot place mode disaggregated \(2 prefill groups of tp 2 x pp 1, "
                                             r"1 decode group of tp 1 x pp 1, on cuda\): needs 5 GPUs, "
                                             r"the cluster has 3 GPUs free") as err:
        plan(cfg, {"CPU": 64.0, "GPU": 3.0})
    assert err.value.needed == {"CPU": 5.0, "GPU": 5.0} and err.value.free == {"CPU": 64.0, "GPU": 3.0}
    assert isinstance(err.value, ValueError)  # the CLI prints it as bad input
    # auto when neither layout fits: both shortfalls.
    with pytest.raises(PlacementError, match="disaggregated needs 2 CPUs, the cluster has 0 CPUs free, and "
                                             "aggregated needs 1 CPU"):
        plan(DEFAULT, {"CPU": 0.0})
    # Not strict (a cluster that may still grow): the placement comes back with the shortfall.
    p = plan(cfg, {"CPU": 64.0, "GPU": 3.0}, strict=False)
    assert not p.fits and p.missing == "needs 5 GPUs, the cluster has 3 GPUs free"


def test_tensor_parallel_group_needs_one_node():
    nodes = [{"CPU": 8.0, "GPU": 1.0}] * 3
    free = {"CPU": 24.0, "GPU": 3.0}
    with pytest.raises(PlacementError, match=r"each prefill group \(tp 2 x pp 1\) needs 2 GPUs on one node, "
                                             r"the largest node has 1 GPU"):
        plan(_disagg(prefill=GroupSpec(tp=2)), free, nodes=nodes)
    # Pipeline stages alone (PACK) may spread over nodes; auto falls back per node too.
    assert plan(_disagg(prefill=GroupSpec(pp=2)), free, nodes=nodes).fits
    p = plan(replace(DEFAULT, prefill=GroupSpec(tp=2)), free, nodes=nodes)
    assert p.mode is Mode.AGGREGATED and "on one node" in p.reason


def test_fractional_gpus_share_one():
    cfg = replace(DEFAULT, gpus_per_rank=0.5).validate()
    p = plan(cfg, {"CPU": 16.0, "GPU": 1.0})
    assert p.mode is Mode.DISAGGREGATED and p.bundles() == [{"CPU": 1.0, "GPU": 0.5}] * 2


def test_placement_wait_and_local_resolution():
    assert placement_wait_s(DEFAULT) == EMBEDDED_PLACEMENT_WAIT_S <= 60
    assert placement_wait_s(replace(DEFAULT, ray=RaySpec(address="auto"))) == JOINED_PLACEMENT_WAIT_S
    assert placement_wait_s(replace(DEFAULT, ray=RaySpec(address="auto", placement_timeout_s=5.0))) == 5.0
    assert resolve_local(DEFAULT).mode == "disaggregated"
    assert resolve_local(replace(DEFAULT, mode="aggregated")).mode == "aggregated"


def test_group_bundles_and_shared_gpu():
    from splitserve.cluster.ray_group import RayGroupOptions, SharedGpu

    tp2 = RayGroupOptions(use_gpu=True, gpus_per_rank=0.5).bundles("g", tp=2, world=4)
    assert tp2.strategy is Strategy.STRICT_PACK and tp2.pp == 2 and tp2.bundle == {"CPU": 1.0, "GPU": 0.5}
    cpu = RayGroupOptions().bundles("g", tp=1, world=2)
    assert cpu.strategy is Strategy.PACK and cpu.bundle == {"CPU": 1.0}
    shared = SharedGpu()
    shared.claim("prefill-0", ("node-a", ("0",)))
    shared.claim("decode-0", ("node-a", ("0",)))
    with pytest.raises(PlacementError, match="decode-1: placed on GPU 1 .* prefill-0 is on GPU 0"):
        shared.claim("decode-1", ("node-a", ("1",)))


# ---- on the session's local Ray ----------------------------------------------------------------


def test_cluster_check_refuses_too_many_cpus(ray_local):
    from splitserve.cluster.placement import plan_on_cluster

    cfg = _disagg(device="cpu", prefill=GroupSpec(count=40))
    start = time.monotonic()
    with pytest.raises(PlacementError, match=r"needs 41 CPUs, the cluster has [\d.]+ CPUs free"):
        plan_on_cluster(cfg)
    assert time.monotonic() - start < 10


def test_unplaceable_group_fails_at_its_placement_deadline(ray_local):
    from splitserve.cluster.ray_group import RayGroupOptions, RayLauncher

    launcher = RayLauncher("too-big-0", 1, RayGroupOptions(placement_timeout_s=1.0))
    start = time.monotonic()
    with pytest.raises(PlacementError, match=r"too-big-0: no room for 40 x \{'CPU': 1.0\} \(PACK\) within 1 s: "
                                             r"needs 40 CPUs, the cluster has [\d.]+ CPUs free"):
        launcher.rendezvous(40)
    assert time.monotonic() - start < 30
    # The pending placement group was removed: it must not be placed later, unused.
    assert ray_local.util.placement_group_table(launcher.pg)["state"] == "REMOVED"
