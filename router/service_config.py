"""What the router side of a service is configured with: the engine its core serves, the core's
admission, and the front doors.

`splitserve.cluster.serve_config.ServeConfig` (the YAML file and the flags) composes these types
(its ``router:`` and ``server:`` sections are `RouterSpec` and `ServerSpec`, its ``groups:`` are
`GroupSpec`) and hands the router a `ServiceConfig` once the mode is chosen
(`ServeConfig.service`). The router never reads the cluster's config: the layers go
cluster > router > workers, and this module is where the router's half lives.

Lifecycle of an `EngineSpec`: made with its mode resolved (never `Mode.AUTO`), then
`disagg_config` builds the `DisaggConfig` of every group (the one builder: the embedded local
router and the Ray engine core both use it, the latter saying how its groups reach each other).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from splitserve.workers.roles import GroupRole, Mode

if TYPE_CHECKING:  # the engine's types: imported where used, so reading a config needs no torch
    from splitserve.router.engine_core import CoreLimits
    from splitserve.router.frontdoor import RequestLimits
    from splitserve.workers.disagg_engine import DisaggConfig
    from splitserve.workers.engine import EngineConfig


MODES = tuple(m.value for m in Mode)
POLICIES = ("round_robin", "least_loaded", "prefix_affinity")
DEFAULT_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8000
#: The name the service gives its model when the config names none (the default model).
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class GroupSpec:
    """How many groups of one role, and each one's layout."""

    count: int = 1
    tp: int = 1
    pp: int = 1
    #: MoE models: whole experts per tp rank (`ParallelConfig.expert_parallel`).
    expert_parallel: bool = False

    def check(self, role: GroupRole) -> None:
        if self.count < 0 or self.tp < 1 or self.pp < 1:
            raise ValueError(f"groups.{role}: count must be >= 0 and tp, pp >= 1, got {self}")


@dataclass(frozen=True)
class RouterSpec:
    policy: str = "least_loaded"
    max_inflight: int = 256
    #: Deadline for one request when the client gives none (seconds).
    request_timeout_s: float = 600.0

    def core_limits(self) -> CoreLimits:
        """The engine core's admission limits."""
        from splitserve.router.engine_core import CoreLimits

        return CoreLimits(self.max_inflight, self.request_timeout_s)


@dataclass(frozen=True)
class ServerSpec:
    host: str = "127.0.0.1"
    grpc_port: int = DEFAULT_GRPC_PORT
    http_port: int = DEFAULT_HTTP_PORT
    api_key: str | None = None
    api_key_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: Largest gRPC message accepted or sent (bytes).
    max_message_bytes: int = 16 * 1024 * 1024
    #: Front-door processes (gRPC and HTTP servers); None: `resolved_api_servers`' default.
    api_servers: int | None = None
    #: Salt every request's prefix cache with a hash of the API key it was authenticated with
    #: (`splitserve.router.cache_salt`): tenants with different keys never share cached blocks,
    #: so ``cached_tokens`` tells none of them what another sent. Needs an API key.
    cache_salt_per_key: bool = False
    #: Input limits (`splitserve.router.frontdoor.RequestLimits`): HTTP body bytes, prompt
    #: characters, stop strings (count, characters each) and stop token ids.
    max_request_bytes: int = 8 * 1024 * 1024
    max_prompt_chars: int = 1024 * 1024
    max_stop_strings: int = 32
    max_stop_chars: int = 256
    max_stop_token_ids: int = 128

    def resolved_api_key(self) -> str | None:
        """The key clients must send, or None when none is configured. A key that is
        configured but empty (``api_key: ""``, an empty or blank key file) is refused: it
        must never turn authentication off."""
        if self.api_key_file:
            try:
                key = Path(self.api_key_file).read_text().strip()
            except OSError as err:
                raise ValueError(f"server.api_key_file {self.api_key_file!r} cannot be read: {err}") from None
            if not key:
                raise ValueError(f"server.api_key_file {self.api_key_file!r} is empty: refusing to serve without "
                                 "the key it was meant to hold")
            return key
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("server.api_key is empty: refusing to serve without authentication (leave it unset "
                             "for none)")
        return self.api_key

    def limits(self) -> RequestLimits:
        """The front doors' `RequestLimits`."""
        # Imported here: the front doors' module brings the serving stack, a config does not need it.
        from splitserve.router.frontdoor import RequestLimits

        return RequestLimits(self.max_request_bytes, self.max_prompt_chars, self.max_stop_strings,
                             self.max_stop_chars, self.max_stop_token_ids)

    def resolved_api_servers(self) -> int:
        """``api_servers``, or one per 8 CPUs of this machine, at least 1 and at most 4 (a
        front door parses and tokenizes; more than a few only take CPUs from the ranks)."""
        if self.api_servers is not None:
            return self.api_servers
        return min(4, max(1, (os.cpu_count() or 1) // 8))


@dataclass(frozen=True)
class EngineSpec:
    """The engine an engine core serves: the model, the settings every group shares, and the
    groups of each role the (chosen) mode starts."""

    mode: Mode
    #: Where the ranks run: "cpu", "cuda", or "auto" (an engine in this process picks).
    device: str
    groups: dict[GroupRole, GroupSpec]
    model: str | None = None
    dtype: str = "auto"
    #: Every group's KV cache: "auto" (the model's dtype) or "fp8" (`EngineConfig.kv_cache_dtype`).
    kv_cache_dtype: str = "auto"
    #: None | "fp8" (`EngineConfig.quantization`).
    quantization: str | None = None
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int = 2 * 1024**3
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.mode is Mode.AUTO:
            raise ValueError("an engine is built for a chosen mode: resolve mode auto first "
                             "(splitserve.cluster.placement)")
        if set(self.groups) != set(self.mode.roles()):
            raise ValueError(f"mode {self.mode} starts {self.mode.roles()} groups, got {tuple(self.groups)}")

    def engine_config(self, role: GroupRole) -> EngineConfig:
        """The `EngineConfig` of each group of ``role``."""
        from splitserve.workers.config import CacheConfig, ParallelConfig, SchedulerConfig
        from splitserve.workers.engine import EngineConfig

        spec = self.groups[role]
        return EngineConfig(
            model=self.model, device=self.device, dtype=self.dtype, quantization=self.quantization,
            max_model_len=self.max_model_len, kv_cache_dtype=self.kv_cache_dtype, show_progress=False,
            detokenize=False,  # served: the front doors decode text and check stop strings
            cache=CacheConfig(self.block_size, self.num_kv_blocks, self.kv_cache_memory),
            parallel=ParallelConfig(spec.tp, spec.pp, expert_parallel=spec.expert_parallel),
            scheduler=SchedulerConfig(max_num_batched_tokens=self.max_num_batched_tokens,
                                      max_num_seqs=self.max_num_seqs, async_scheduling=self.async_scheduling),
        )

    def disagg_config(self, *, in_process: bool | None = None, transport: str | None = None,
                      store_host: str = "127.0.0.1") -> DisaggConfig:
        """The `DisaggConfig` of every group. How the groups reach each other is the caller's
        (the defaults are `DisaggConfig`'s: groups in this process or its children):
        ``in_process`` False for groups on Ray actors, ``transport`` between prefill and
        decode (disaggregated only), ``store_host`` where ranks reach the driver's TCPStore."""
        from splitserve.workers.disagg_engine import DisaggConfig

        if self.mode is Mode.DISAGGREGATED:
            return DisaggConfig(prefill=self.engine_config(GroupRole.PREFILL),
                                decode=self.engine_config(GroupRole.DECODE),
                                num_prefill=self.groups[GroupRole.PREFILL].count,
                                num_decode=self.groups[GroupRole.DECODE].count,
                                in_process=in_process, transport=transport, store_host=store_host)
        if transport is not None:
            raise ValueError("aggregated groups move no KV: no transport to choose")
        return DisaggConfig(prefill=None, decode=self.engine_config(GroupRole.WORKER),
                            num_decode=self.groups[GroupRole.WORKER].count, in_process=in_process,
                            store_host=store_host)

    def roles(self) -> dict[str, tuple[int, int, int]]:
        """Each role's (count, tp, pp), as the service reports it (`ModelInfo.roles`)."""
        return {str(role): (spec.count, spec.tp, spec.pp) for role, spec in self.groups.items()}


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the router side reads: the engine, the core's admission, the front doors."""

    engine: EngineSpec
    router: RouterSpec = field(default_factory=RouterSpec)
    server: ServerSpec = field(default_factory=ServerSpec)

    @property
    def model_name(self) -> str:
        return self.engine.model or DEFAULT_MODEL_NAME
