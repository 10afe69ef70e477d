"""What `splitserve serve` starts: the model, the worker groups, the router and the ports.

Lifecycle: a YAML file (optional) is read into a `ServeConfig` (`load_serve_config`), then
command-line flags override single fields (`ServeConfig.with_overrides`), then `validate`
checks the whole before anything starts. With no file and no flags it is the embedded
default: local Ray, the default model, mode auto (one prefill and one decode group when the
machine has room for both, else one aggregated group), 127.0.0.1. Mode "auto" stays in the
config until the groups are placed: `splitserve.cluster.placement` chooses against what the
cluster has free, and `Placement.apply` gives the config of the mode chosen.

The file's shape (every key optional)::

    model: null                 # default model; a local HF folder; random:<name>
    mode: auto                  # auto | aggregated | disaggregated; auto: disaggregated when
                                # the cluster has room for the prefill and decode groups, else
                                # the aggregated worker groups (the choice and why are logged)
    device: auto                # auto | cpu | cuda
    gpus_per_rank: 1.0          # GPU share of each rank (0 < x <= 1); below 1, one-rank groups
                                # share a GPU: e.g. 0.5 puts one prefill and one decode group
                                # on one GPU, their KV moved by CUDA IPC (all of a
                                # disaggregated layout's groups must then fit on one GPU)
    dtype: auto
    kv_cache_dtype: auto        # auto (the model's dtype) | fp8 (e4m3 with per-head scales:
                                # twice the KV blocks per byte; both roles use the same)
    quantization: null          # null | fp8: FP8 weights (FP8 checkpoints load as such anyway)
    max_model_len: null
    block_size: 16
    num_kv_blocks: null         # per rank; null: sized from kv_cache_memory
    kv_cache_memory: 2147483648 # bytes per rank
    max_num_batched_tokens: 2048 # tokens one step computes per group (prefill chunks + decodes)
    max_num_seqs: 256           # sequences running at once per group
    single_group_in_core: true  # one aggregated group of one rank: the engine-core process
                                # runs its model itself (no rank process, no per-step pipe)
    async_scheduling: null      # schedule step n+1 while the GPU runs step n; null: on for
                                # one-rank groups on CUDA; true needs pp = 1 (any tp)
    groups:
      prefill: {count: 1, tp: 1, pp: 1}
      decode:  {count: 1, tp: 1, pp: 1}
      worker:  {count: 1, tp: 1, pp: 1}   # aggregated mode's groups (auto's fallback)
                                          # (any group: expert_parallel: true for MoE models)
    router:
      policy: least_loaded      # round_robin | least_loaded | prefix_affinity
      max_inflight: 256         # requests admitted at once; beyond: overload error
    server:
      host: 127.0.0.1
      grpc_port: 50051
      http_port: 8000
      api_key: null             # or api_key_file: a file holding the key
      cache_salt_per_key: false # salt every request's prefix cache with a hash of its API key:
                                # callers with different keys never share cached blocks, nor
                                # see each other's hits in cached_tokens (needs a key)
      tls_cert: null
      tls_key: null
      api_servers: null         # front-door processes; null: min(4, max(1, CPUs // 8))
      max_request_bytes: 8388608  # HTTP body; beyond: 413 (gRPC: max_message_bytes)
      max_prompt_chars: 1048576 # text prompt (or all of a chat); beyond: 400
      max_stop_strings: 32      # stop strings per request, each at most max_stop_chars
      max_stop_chars: 256
      max_stop_token_ids: 128
    ray:
      address: null             # null: start an embedded local Ray; "auto": join a cluster
      num_cpus: null            # embedded Ray only
      placement_timeout_s: null # how long a group may wait for room before it fails; null:
                                # 60 s on an embedded Ray (it never grows), 300 s when joining
                                # a cluster (nodes may still be starting or autoscaling)
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

# The router's sections are the router's types (`splitserve.router.service_config`); they are
# named here too, since the serve config is where users meet them.
from splitserve.router.service_config import (DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, MODES, POLICIES, EngineSpec,
                                              GroupSpec, Mode, RouterSpec, ServerSpec, ServiceConfig)
from splitserve.workers.quant_config import SUPPORTED_QUANTIZATION
from splitserve.workers.roles import GroupRole

__all__ = ["DEFAULT_GRPC_PORT", "DEFAULT_HTTP_PORT", "MODES", "POLICIES", "GroupSpec", "Mode", "RaySpec", "RouterSpec",
           "ServeConfig", "ServerSpec", "config_from_dict", "load_serve_config"]

logger = logging.getLogger(__name__)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RaySpec:
    address: str | None = None
    num_cpus: int | None = None
    namespace: str = "splitserve"
    #: Seconds a group's placement group may stay pending before the group fails; None: 60 on
    #: an embedded Ray, 300 when joining a cluster (`splitserve.cluster.placement`).
    placement_timeout_s: float | None = None


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None
    #: A `Mode` value; "auto" until `splitserve.cluster.placement` chooses.
    mode: str = Mode.AUTO.value
    device: str = "auto"
    #: Each rank's share of a GPU (0 < x <= 1): below 1, one-rank groups share GPUs.
    gpus_per_rank: float = 1.0
    dtype: str = "auto"
    #: "auto" (the model's dtype) or "fp8": every group's KV cache (prefill and decode must agree).
    kv_cache_dtype: str = "auto"
    quantization: str | None = None
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int = 2 * 1024**3
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    async_scheduling: bool | None = None
    #: A lone one-rank aggregated group runs in the engine-core process (no rank process
    #: between the engine loop and the model; see `cluster.groups.group_in_core`).
    single_group_in_core: bool = True
    prefill: GroupSpec = field(default_factory=GroupSpec)
    decode: GroupSpec = field(default_factory=GroupSpec)
    worker: GroupSpec = field(default_factory=GroupSpec)
    router: RouterSpec = field(default_factory=RouterSpec)
    server: ServerSpec = field(default_factory=ServerSpec)
    ray: RaySpec = field(default_factory=RaySpec)

    def validate(self) -> "ServeConfig":
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.router.policy not in POLICIES:
            raise ValueError(f"router.policy must be one of {POLICIES}, got {self.router.policy!r}")
        if self.router.max_inflight < 1:
            raise ValueError("router.max_inflight must be >= 1")
        from splitserve.workers.kv_cache import check_kv_cache_dtype

        check_kv_cache_dtype(self.kv_cache_dtype)
        for role in self._possible_roles():
            self.group(role).check(role)
        if self.mode != Mode.AGGREGATED and (self.prefill.count < 1 or self.decode.count < 1):
            raise ValueError(f"{self.mode} mode needs at least one prefill and one decode group")
        if self.mode != Mode.DISAGGREGATED and self.worker.count < 1:
            raise ValueError(f"{self.mode} mode needs at least one worker group")
        self._check_gpu_share()
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.quantization is not None and self.quantization not in SUPPORTED_QUANTIZATION:
            raise ValueError(f"quantization must be null or one of {list(SUPPORTED_QUANTIZATION)}, "
                             f"got {self.quantization!r}")
        staged = [role for role in self._possible_roles() if self.group(role).pp > 1]
        if self.async_scheduling and staged:
            raise ValueError(f"async_scheduling needs pp = 1 in every group; {', '.join(staged)} groups have "
                             "more stages: leave it unset (on where it applies) or false")
        if bool(self.server.tls_cert) != bool(self.server.tls_key):
            raise ValueError("server.tls_cert and server.tls_key go together")
        key = self.server.resolved_api_key()  # an empty key refuses to start (fails closed)
        if self.server.cache_salt_per_key and not key:
            raise ValueError("server.cache_salt_per_key salts the prefix cache by API key: set server.api_key or "
                             "server.api_key_file (without a key it would silently salt nothing)")
        if key and not self.server.tls_cert and not _loopback(self.server.host):
            logger.warning("an API key is set but TLS is not, on %s: the key crosses the network in clear text "
                           "(set server.tls_cert/tls_key, or terminate TLS in front of the service)",
                           self.server.host)
        for port in (self.server.grpc_port, self.server.http_port):
            if not 0 <= port < 65536:
                raise ValueError(f"port out of range: {port}")
        limits = (self.server.max_request_bytes, self.server.max_prompt_chars, self.server.max_stop_strings,
                  self.server.max_stop_chars, self.server.max_stop_token_ids)
        if min(limits) < 1:
            raise ValueError(f"server limits (max_request_bytes, max_prompt_chars, max_stop_*) must be >= 1, "
                             f"got {limits}")
        if self.server.api_servers is not None and self.server.api_servers < 1:
            raise ValueError(f"server.api_servers must be >= 1 (or null for the default), "
                             f"got {self.server.api_servers}")
        if self.ray.placement_timeout_s is not None and self.ray.placement_timeout_s <= 0:
            raise ValueError(f"ray.placement_timeout_s must be positive, got {self.ray.placement_timeout_s}")
        return self

    def _check_gpu_share(self) -> None:
        g = self.gpus_per_rank
        if not 0 < g <= 1:
            raise ValueError(f"gpus_per_rank must be in (0, 1], got {g}")
        if g == 1:
            return
        # Ranks of one group on one GPU would need NCCL between two ranks of one device, which
        # it refuses ("Duplicate GPU detected"): only one-rank groups share.
        multi = [r for r in self._possible_roles() if self.group(r).tp * self.group(r).pp > 1]
        if multi:
            raise ValueError(f"gpus_per_rank {g:g} < 1 shares GPUs between one-rank groups only; "
                             f"{', '.join(multi)} groups have tp x pp > 1")
        if self.mode != Mode.AGGREGATED:
            # Groups that share a GPU move KV by CUDA IPC (one transport for the whole engine),
            # which reaches only a process on the same GPU: all of them must fit on one.
            ranks = self.prefill.count + self.decode.count
            if ranks * g > 1 + 1e-9:
                raise ValueError(f"gpus_per_rank {g:g}: the {ranks} prefill and decode groups would need "
                                 f"{ranks * g:g} GPUs; groups that share GPUs must all fit on one (their KV "
                                 f"moves by CUDA IPC): at most {int(1 / g + 1e-9)} groups, or gpus_per_rank 1")

    def _possible_roles(self) -> tuple[GroupRole, ...]:
        """Every role this mode may start: auto may start either layout."""
        return tuple(GroupRole) if self.mode == Mode.AUTO else self.roles()

    def roles(self) -> tuple[GroupRole, ...]:
        """The group roles this mode starts, in start order. Mode auto has not chosen yet: it
        answers the disaggregated roles it tries first; the config `Placement.apply` returns
        answers the roles it really starts."""
        return Mode(self.mode).roles()

    def group(self, role: GroupRole) -> GroupSpec:
        """The ``groups.<role>`` section."""
        return getattr(self, role.value)

    def service(self, device: str | None = None) -> ServiceConfig:
        """The router's config of this (validated) config, its mode chosen (`Placement.apply`,
        or `placement.resolve_local` without Ray); ``device``: where the ranks run, resolved
        against the cluster (None: ``self.device`` as it is)."""
        engine = EngineSpec(
            mode=Mode(self.mode), device=self.device if device is None else device,
            groups={role: self.group(role) for role in self.roles()}, model=self.model, dtype=self.dtype,
            kv_cache_dtype=self.kv_cache_dtype, quantization=self.quantization, max_model_len=self.max_model_len,
            block_size=self.block_size, num_kv_blocks=self.num_kv_blocks,
            kv_cache_memory=self.kv_cache_memory, max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs, async_scheduling=self.async_scheduling)
        return ServiceConfig(engine, self.router, self.server)

    def with_overrides(self, **flat: Any) -> "ServeConfig":
        """Apply flags: keys are field names, ``<role>_<count|tp|pp>`` or ``<section>_<field>``;
        a None value leaves the field as it is."""
        cfg = self
        for key, value in flat.items():
            if value is None:
                continue
            if key in {f.name for f in fields(ServeConfig)} and not _is_section(key):
                cfg = replace(cfg, **{key: value})
                continue
            section, _, name = key.partition("_")
            if not _is_section(section):
                raise ValueError(f"unknown setting {key!r}")
            cfg = replace(cfg, **{section: replace(getattr(cfg, section), **{name: value})})
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SECTIONS = {**{role.value: GroupSpec for role in GroupRole}, "router": RouterSpec, "server": ServerSpec,
             "ray": RaySpec}


def _is_section(name: str) -> bool:
    return name in _SECTIONS


def config_from_dict(data: dict[str, Any]) -> ServeConfig:
    """A `ServeConfig` from the YAML file's mapping; unknown keys are errors (typos are caught)."""
    data = dict(data or {})
    groups = data.pop("groups", {}) or {}
    kwargs: dict[str, Any] = {}
    for role, value in groups.items():
        if role not in tuple(GroupRole):
            raise ValueError(f"groups: unknown role {role!r} ({', '.join(GroupRole)})")
        kwargs[role] = _section(GroupSpec, value, f"groups.{role}")
    for name, value in data.items():
        if name in ("router", "server", "ray"):
            kwargs[name] = _section(_SECTIONS[name], value, name)
        elif name in {f.name for f in fields(ServeConfig)} and not _is_section(name):
            kwargs[name] = value
        else:
            raise ValueError(f"unknown key {name!r} in the serve config")
    return ServeConfig(**kwargs).validate()


def _section(cls, value: Any, where: str):
    value = value or {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping")
    known = {f.name for f in fields(cls)}
    unknown = set(value) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    return cls(**value)


def load_serve_config(path: str | Path | None) -> ServeConfig:
    """The file's config, or the embedded default when ``path`` is None."""
    if path is None:
        return ServeConfig().validate()
    import yaml

    with open(path) as f:
        return config_from_dict(yaml.safe_load(f) or {})
