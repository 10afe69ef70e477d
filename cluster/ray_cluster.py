"""Joining a Ray cluster, or starting an embedded local one.

``address`` "auto" or host:port (or $RAY_ADDRESS) joins an existing cluster (`ray up`,
KubeRay); None starts a local Ray in this process, its dashboard off and ``num_cpus``
logical CPUs (rank bundles reserve CPUs: on a small machine ask for more than it has, the
ranks set their own torch threads). Everything splitserve creates lives in the
``splitserve`` namespace.
"""

from __future__ import annotations

import os

import ray

NAMESPACE = "splitserve"


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # The package travels with the job (a local cluster's workers import it from here too).
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, namespace=NAMESPACE, runtime_env=env, log_to_driver=True)
        return
    ray.init(num_cpus=num_cpus or max(8, os.cpu_count() or 1), namespace=NAMESPACE, include_dashboard=False,
             runtime_env=env, log_to_driver=True)
