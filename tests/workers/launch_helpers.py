"""What the worker-group fault tests share: groups of rank processes with one torch thread
each, so several groups fit on a 2-core machine."""

from __future__ import annotations

from splitserve.workers.engine import LLMEngine
from splitserve.workers.worker_group import ProcessLauncher


class OneThreadLauncher(ProcessLauncher):
    """Rank processes with one torch thread each: 4 groups share 2 cores."""

    def num_threads(self, spec, world: int) -> int:
        return 1


def build_group(group) -> LLMEngine:
    """A `DisaggEngine` engine factory: the group's ranks as one-thread processes."""
    return LLMEngine(group.config, launcher=OneThreadLauncher())
