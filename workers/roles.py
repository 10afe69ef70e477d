"""How the groups split the work, what each group is for, and what happens to a request whose
KV transfer fails.

Both are `enum.StrEnum`: a value equals its string (YAML sections, CLI flags and metric labels
stay the strings users write), while the code names a closed set the type checker can follow.
"""

from __future__ import annotations

import enum


class GroupRole(enum.StrEnum):
    """A worker group's part in serving."""

    #: Computes prompts and pushes their KV to a decode group.
    PREFILL = "prefill"
    #: Receives KV, then generates (also prefills a request itself on recompute).
    DECODE = "decode"
    #: Aggregated: prefills and decodes its own requests, no transfer.
    WORKER = "worker"

    @property
    def generates(self) -> bool:
        """Whether requests run to their end on this group (decode or aggregated)."""
        return self is not GroupRole.PREFILL


class FailurePolicy(enum.StrEnum):
    """A request whose KV transfer fails (or never starts)."""

    #: The decode group prefills the prompt itself; greedy output is unchanged.
    RECOMPUTE = "recompute"
    #: The request ends with finish_reason "abort" and an error.
    FAIL = "fail"


class Mode(enum.StrEnum):
    """How the groups split the work. A StrEnum: the config keeps the plain string (YAML), and
    ``cfg.mode == Mode.AUTO`` compares as a string does."""

    #: disaggregated when the cluster has room for its groups, else aggregated
    AUTO = "auto"
    #: each group prefills and decodes (``groups.worker``)
    AGGREGATED = "aggregated"
    #: prefill groups hand their KV to decode groups (``groups.prefill``, ``groups.decode``)
    DISAGGREGATED = "disaggregated"

    def roles(self) -> tuple[GroupRole, ...]:
        """The group roles this mode starts, in start order. Auto has not chosen yet: it answers
        the disaggregated roles it tries first."""
        return (GroupRole.WORKER,) if self is Mode.AGGREGATED else (GroupRole.PREFILL, GroupRole.DECODE)
