"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step (Hopper and later).

A decode step at batch 1 is a few hundred small kernels, and between two of them the GPU drains
the first before it starts the second: the second's launch, its programs' set-up and the latency
of its first loads are paid in series, a few microseconds each time (benchmarks/decode_profile.py
shows the kernels' device time well under the graph-replayed step). With PDL a kernel launched
with the programmatic-serialisation attribute may start while the kernel before it still runs,
once every program of that kernel has executed ``griddepcontrol.launch_dependents`` (or exited).

The contract each kernel here keeps:

- a kernel that may run early calls `gdc_wait` before it reads anything the kernel before wrote
  (activations) and before it writes anything at all (the kernel before may still be reading the
  buffer the allocator hands out for its output). Before the wait it only computes addresses and
  loads constants: weights and their scales. `gdc_wait` returns once the kernel before has
  completed and its writes are visible; that kernel waited for its own predecessor before its
  work, so the order of the whole chain is kept.
- a kernel calls `gdc_launch_dependents` at its start, so the next can be scheduled onto SMs as
  they free up (its programs then hold their registers while they wait, which is why this is
  per kernel and measured: `linear_triton.SkinnyConfig.pdl`).

Triton has both instructions (``triton.language.extra.cuda``, 3.3 and later) and the launch
attribute (the ``launch_pdl`` launch option); recorded into a CUDA graph, the attribute becomes a
programmatic edge of the graph. On anything else (CPU interpreter, older GPUs, older Triton, or
``SPLITSERVE_PDL=0``) `enabled` is False and the kernels are launched and ordered as usual.
"""

from __future__ import annotations

import os
from functools import cache

import torch
import triton

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    AVAILABLE = True
except ImportError:  # an older Triton: the kernels never take the PDL branches (enabled is False)
    AVAILABLE = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


#: "0" turns PDL off (an A/B switch for benchmarks, and a way out should a driver misbehave);
#: "1" (the default) launches the skinny linears early, the kernels before them letting them;
#: "2" launches the norm, SiLU and decode-attention kernels early too (`mode`).
ENV = "SPLITSERVE_PDL"

__all__ = ["AVAILABLE", "ENV", "enabled", "gdc_launch_dependents", "gdc_wait", "launch_kwargs", "mode"]


@cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` may be launched with PDL (read per call: cheap, and a
    benchmark can flip ``SPLITSERVE_PDL`` between runs)."""
    if device.type != "cuda" or not AVAILABLE or os.environ.get(ENV, "1") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def mode(device: torch.device) -> int:
    """The PDL mode of a kernel that only lets the next start (norm, SiLU, decode attention):
    0 none; 1 it triggers its dependents at its start; 2 it also is launched early itself and
    waits (``SPLITSERVE_PDL=2``) before anything else."""
    if not enabled(device):
        return 0
    return 2 if os.environ.get(ENV, "1") == "2" else 1


def launch_kwargs(mode: int | bool) -> dict:
    """Triton launch options for a kernel launched early (``mode`` truthy: a skinny-kernel PDL
    mode, or True; for the `mode` kernels pass ``mode == 2``)."""
    return {"launch_pdl": True} if mode else {}
