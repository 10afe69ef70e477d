"""The engine: one process's request loop over a scheduler, a model runner and a cache.

Lifecycle:
    engine = LLMEngine(EngineConfig(model=...))     # resolve, load, allocate the KV cache
    engine.add_request(id, prompt_ids, params)      # validated; bad input raises ValueError
    while engine.has_unfinished_requests():
        for output in engine.step():                 # schedule -> forward+sample -> update
            ...                                      # RequestOutput snapshots, `finished` last
    engine.abort_request(id)                         # any time; frees the request's blocks

A step reads: schedule, launch, wait, update. It submits micro-batches (`_submit_ready`:
`Scheduler.schedule` -> `StepBatch` -> executor), then waits for the oldest one and hands its
tokens to the scheduler (`Scheduler.update_from_output`, the one writer of a request's
progress), then reports what changed: with one pipeline stage that is schedule ->
forward+sample -> update; with ``pp`` stages up to ``pp``
micro-batches are in flight so every stage has work. With async scheduling (pp = 1; on by
default for one rank on CUDA) two are: step n+1 is scheduled and queued while the device runs step n, its
decode rows' tokens left as placeholders that the runner fills from step n's samples on the
device, so the host's work per step hides behind the device's. Text is decoded
incrementally only for requests that stream or have stop strings; the rest are decoded once
when they finish, which keeps the per-step cost independent of the tokenizer.

A step that raises on the ranks (a query of death: a request whose input or parameters make
the model or the sampler throw) costs only its batch when the ranks go on (`StepError`), and
at most its group when they cannot (`WorkerGroupError.step_failure`). The batch's requests are
judged (`blamed`): alone in the batch, a request is the *culprit*: it fails with an error and is
never run again; with others, each is a *suspect*: it is run again in batches of its own
(`Scheduler.isolate`), so that if it raises again it is alone, hence the culprit, and the
innocent finish as they would have. Batches sent after the failed one (async scheduling) are
collected and dropped too (they may read what it never wrote); their other requests are simply
computed again. A prefill group's requests are not re-run here: they are aborted, with their
verdict in `blamed`, and the disaggregated driver re-sends the innocent (disagg_engine.py).

What a group does in disaggregated serving is its role's (engine_roles.py: prefill, decode, or
none when aggregated), chosen from the KV agent's role and called at fixed points: as a step is
submitted (its KV sends), as a request finishes (keep its blocks?), as one fails. The drivers
above see the `GroupEngine` protocol (group_engine.py); the executor and block manager are the
engine's own.
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from splitserve.kvtransfer.agent import KVAgentSpec
from splitserve.kvtransfer.messages import KVLayout, KVRoute, RecvCommand, TransferEvent
from splitserve.workers.block_manager import BlockManager
from splitserve.workers.cache_salt import check_cache_salt
from splitserve.workers.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig
from splitserve.workers.detokenizer import IncrementalDetokenizer
from splitserve.workers.engine_roles import (  # noqa: F401  (KVSendHook, SendPlan: the drivers import them here)
    DecodeRole, EngineRole, KVSendHook, PrefillRole, SendPlan, first_token_params, make_role)
from splitserve.workers.executor import Executor, RunnerSpec, StepError, WorkerGroupError, make_executor
from splitserve.workers.group_engine import KVUsage
from splitserve.workers.kv_cache import KVCacheDtype, KVCacheSpec, check_kv_cache_dtype, resolve_kv_dtype
from splitserve.workers.kv_scales import assemble_scales, scales_fingerprint
from splitserve.workers.model_source import load_tokenizer, resolve_model
from splitserve.workers.outputs import RequestOutput
from splitserve.workers.quant_config import resolve_quantization
from splitserve.workers.roles import GroupRole
from splitserve.workers.sampler import SamplerOutput
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.scheduler import Scheduler, SchedulerOutput
from splitserve.workers.sequence import Sequence, SequenceStatus
from splitserve.workers.step_batch import build_step_batch, sampling_rows
from splitserve.workers.stop_checker import StopDecision, stream_holdback

logger = logging.getLogger(__name__)



class Verdict(enum.StrEnum):
    """What a step that raised on the ranks makes of one of its requests (module doc)."""

    #: Alone in the batch: it caused the exception; failed, never run again.
    CULPRIT = "culprit"
    #: With others: run again in batches of its own until it finishes or raises alone.
    SUSPECT = "suspect"
    #: In a batch sent after the one that raised: dropped with it, computed again.
    REQUEUE = "requeue"


class Blame(NamedTuple):
    verdict: Verdict
    reason: str

@dataclass(frozen=True)
class EngineConfig:
    #: Model spec: None (default model), a local HF folder, or ``random:<name>``.
    model: str | None = None
    #: "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    #: "auto" (float32 on CPU, bfloat16 on CUDA), "float32", "bfloat16", "float16".
    dtype: str = "auto"
    #: None, or "fp8": FP8 weights (an unquantized checkpoint is quantized at load; an FP8
    #: checkpoint is read as its config.json says, with or without this).
    quantization: str | None = None
    #: Longest prompt + output; None: the model's max_position_embeddings.
    max_model_len: int | None = None
    #: Seed of random weights (``random:`` models) when the spec has none.
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    show_progress: bool = True
    #: This engine's part in the KV transfer service (disaggregated mode).
    kv: KVAgentSpec | None = None
    #: Run ranks as processes even for one rank (the other group of a disaggregated pair is).
    rank_processes: bool = False
    #: GPUs taken by another group of this machine placed first (disaggregated mode).
    device_offset: int = 0
    #: Decode text and apply stop strings here. The serving engine core leaves both to its
    #: front doors (their processes, not the step's): its outputs then carry token ids only.
    detokenize: bool = True
    #: The KV cache's element type: "auto" (the model's dtype) or "fp8" (float8_e4m3fn with
    #: per-head scales: twice the blocks in the same budget; kv_cache.py, kv_scales.py).
    kv_cache_dtype: KVCacheDtype | str = KVCacheDtype.AUTO

    def __post_init__(self) -> None:
        # Configs and CLIs give strings: checked here, once (an unknown name raises ValueError).
        object.__setattr__(self, "kv_cache_dtype", check_kv_cache_dtype(self.kv_cache_dtype))


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {['auto', *_DTYPES]}")
    return _DTYPES[name]


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer | None
    stream: bool
    prompt: str | None
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    #: Where a matched stop string cuts the text (None keeps it all).
    truncate_to: int | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig, launcher=None):
        """``launcher`` starts the ranks elsewhere (Ray actors); None: this process, or spawned
        processes for several ranks."""
        self.config = config
        source = resolve_model(config.model)
        self.tokenizer = load_tokenizer(source)
        self.model_cfg = ModelConfig.from_hf(source.hf_config)
        quant = resolve_quantization(config.quantization, source.hf_config)  # refused here, before any rank
        self.eos_token_ids = self._eos_token_ids()
        self.device = resolve_device(config.device)
        async_scheduling = self._async_scheduling()  # checked before any rank starts
        dtype = resolve_dtype(config.dtype, self.device)
        #: The KV cache's element type (the model's unless ``kv_cache_dtype`` says otherwise).
        self.kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, dtype)
        self.max_model_len = min(config.max_model_len or self.model_cfg.max_position_embeddings,
                                 self.model_cfg.max_position_embeddings)
        num_blocks = self._num_blocks(dtype)
        self._executor: Executor = make_executor(RunnerSpec(
            model_cfg=self.model_cfg, weights_dir=source.weights_dir,
            seed=source.random_seed if source.random_seed is not None else config.seed,
            num_blocks=num_blocks, block_size=config.cache.block_size, dtype=dtype,
            device_type=self.device.type, device_index=self.device.index,
            eos_token_ids=self.eos_token_ids, show_progress=config.show_progress, kv=config.kv,
            device_offset=config.device_offset, async_scheduling=async_scheduling, quant=quant,
            kv_dtype=None if self.kv_dtype == dtype else self.kv_dtype,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
        ), config.parallel, processes=config.rank_processes, launcher=launcher)
        self._block_manager = BlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self._block_manager, lookahead=async_scheduling,
                                   max_model_len=self.max_model_len, eos_token_ids=self.eos_token_ids,
                                   on_finished=self._on_finished)
        self._role: EngineRole = make_role(GroupRole(config.kv.role) if config.kv is not None else GroupRole.WORKER,
                                           self.scheduler)
        self._step_ids = itertools.count(1)
        self._requests: dict[str, _Request] = {}
        self._pending: list[RequestOutput] = []  # aborted between steps, reported by the next step
        self._inflight: deque[SchedulerOutput] = deque()  # submitted micro-batches, oldest first
        self._failure: str | None = None
        self._ids = itertools.count()
        #: Set by `fail_all`: request id -> tokens it had generated when the group failed.
        self.lost_outputs: dict[str, list[int]] = {}
        #: Requests of a batch that raised on the ranks, judged in the latest `step` (or by
        #: `fail_all`): request id -> its `Blame`, for the disaggregated driver (module doc).
        self.blamed: dict[str, Blame] = {}

    def _async_scheduling(self) -> bool:
        """Asked for: needs pp = 1 (a first stage would need the last stage's samples before
        it starts). Unset: on for one-rank groups on CUDA, the layout measured on GPUs; tp > 1
        groups share their samples over the tp group and take it when asked."""
        wanted = self.config.scheduler.async_scheduling
        parallel = self.config.parallel
        if wanted and parallel.pipeline_parallel_size > 1:
            raise ValueError("async scheduling needs pp = 1: the first pipeline stage would need the tokens "
                             "that the last stage has not sampled yet")
        if wanted is not None:
            return wanted
        return parallel.world_size == 1 and self.device.type == "cuda"

    @property
    def async_scheduling(self) -> bool:
        """Step n+1 is scheduled while step n runs (the scheduler looks ahead)."""
        return self.scheduler.lookahead

    def _num_blocks(self, dtype: torch.dtype) -> int:
        # The KV budget is per rank; the first pipeline stage holds the most layers.
        first = self.config.parallel.mapping(0)
        per_rank = KVCacheSpec.for_rank(self.model_cfg, first, 1, self.config.cache.block_size, dtype,
                                        self.kv_dtype)
        return self.config.cache.resolve_num_blocks(per_rank.bytes_per_token)

    def _eos_token_ids(self) -> tuple[int, ...]:
        # The config may list several (Llama 3 instruct); the tokenizer's counts too.
        ids = list(self.model_cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(ids))

    # ---- requests ----------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("empty prompt: a request needs at least one prompt token")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token-id lists")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request cannot run here; changes nothing."""
        if self._failure is not None:
            raise RuntimeError(f"the engine's worker group failed and cannot take requests: {self._failure}")
        if not prompt_ids:
            raise ValueError("empty prompt: a request needs at least one prompt token")
        # Length first: a huge prompt is refused before anything scans it.
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens is too long: the model's max length is "
                f"{self.max_model_len} tokens, prompt + at least one generated token")
        bad = [t for t in prompt_ids if not 0 <= t < self.model_cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.model_cfg.vocab_size}): {bad[:5]}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        if params.stop and not self.config.detokenize:
            raise ValueError("this engine leaves text to its front doors: stop strings are checked there")
        budget = self.config.scheduler.max_num_batched_tokens
        if not self.config.scheduler.enable_chunked_prefill and len(prompt_ids) > budget:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds the per-step budget of {budget} "
                             "tokens and chunked prefill is off")
        need = self._block_manager.blocks_needed(min(len(prompt_ids) + params.max_tokens, self.max_model_len))
        if need > self._block_manager.num_blocks:
            raise ValueError(
                f"request needs up to {need} KV blocks but the cache holds {self._block_manager.num_blocks}: "
                "lower max_tokens or enlarge the KV-cache budget")

    def add_request(self, request_id: str | None, prompt_ids: list[int], params: SamplingParams | None = None,
                    *, stream: bool = False, prompt: str | None = None, cache_salt: str | None = None) -> str:
        """Queue a tokenized request (see `tokenize`); ``prompt`` is its text, for the output.
        ``cache_salt``: it shares prefix-cache blocks only with requests of the same salt."""
        if isinstance(self._role, PrefillRole):
            raise RuntimeError("a prefill group computes prompts for decode groups: use add_prefill_request")
        return self._add(request_id, prompt_ids, params or SamplingParams(), stream, prompt, cache_salt)

    def _add(self, request_id: str | None, prompt_ids: list[int], params: SamplingParams, stream: bool,
             prompt: str | None, cache_salt: str | None) -> str:
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate(prompt_ids, params)
        check_cache_salt(cache_salt)
        seq = Sequence(request_id, list(prompt_ids), params, cache_salt=cache_salt)
        self._track(seq, stream, prompt)
        self.scheduler.add(seq)
        return request_id

    def _track(self, seq: Sequence, stream: bool, prompt: str | None) -> _Request:
        needs_text = self.config.detokenize and self.tokenizer is not None and (stream or bool(seq.params.stop))
        detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids) if needs_text else None
        req = self._requests[seq.request_id] = _Request(seq, detok, stream, prompt)
        return req

    # ---- disaggregated roles (driven by DisaggEngine; engine_roles.py) -----------------

    def _as(self, role: type[EngineRole]) -> Any:
        if not isinstance(self._role, role):
            raise RuntimeError(f"this is a {self._role.kind} group: only a {role.kind} group can do that")
        return self._role

    def enable_kv_sends(self, hook: KVSendHook) -> None:
        self._as(PrefillRole).enable_sends(hook)

    def add_prefill_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                            plan: SendPlan, cache_salt: str | None = None) -> None:
        """Prefill role: compute the prompt and sample the first token with the request's own
        params; push the KV during the last chunk; keep the blocks until `release`. The salt
        is decode's (`reserve`): both roles partition their prefix caches alike."""
        role = self._as(PrefillRole)
        self._add(request_id, prompt_ids, first_token_params(params), False, None, cache_salt)
        role.add(request_id, plan)

    def release(self, request_id: str) -> None:
        """Prefill role: decode has the KV (or gave up): free the blocks, keep them cached."""
        self._as(PrefillRole).release(request_id)

    def reserve(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                cache_salt: str | None = None) -> Sequence | None:
        """Decode role: blocks for the prompt and the first token, minus what the prefix cache
        already holds (of this ``cache_salt`` only); None if they are not free now. Nothing is
        queued."""
        role = self._as(DecodeRole)
        self.validate(prompt_ids, params)
        check_cache_salt(cache_salt)
        seq = Sequence(request_id, list(prompt_ids), params, cache_salt=cache_salt)
        return seq if role.reserve(seq) else None

    def cancel_reservation(self, seq: Sequence) -> None:
        self._as(DecodeRole).cancel(seq)

    def admit_prefilled(self, seq: Sequence, first_token: int, logprobs: Any, *, stream: bool = False,
                        prompt: str | None = None) -> None:
        """Decode role: the prompt's KV arrived in the reserved blocks; decode from here."""
        self._as(DecodeRole).admit(seq)
        req = self._track(seq, stream, prompt)
        stop = self.scheduler.append_token(seq, first_token, logprobs, self._text_of)
        self._report(req, stop, self._pending)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks; the next `step` reports it as "abort"."""
        req = self._requests.pop(request_id, None)
        if req is None or req.seq.is_finished:
            return
        self.scheduler.finish(req.seq, SequenceStatus.FINISHED_ABORTED)
        self._pending.append(self._output(req))

    def isolate(self, request_id: str) -> None:
        """Run this request in batches of its own from now on: a suspect of a step that raised
        elsewhere, so that if it raises here it is found alone (module doc)."""
        req = self._requests.get(request_id)
        if req is not None:
            self.scheduler.isolate(req.seq)

    def has_request(self, request_id: str) -> bool:
        """The id is queued, running, or held for a transfer here."""
        return request_id in self._requests or self._role.holds(request_id)

    @property
    def failure(self) -> str | None:
        """Why the worker group failed, once it has; None while it works."""
        return self._failure

    def has_unfinished_requests(self) -> bool:
        # A batch in flight may belong to requests that already ended (a stop token one step
        # ahead of async scheduling): it must still come back to free their blocks.
        return self.scheduler.num_unfinished > 0 or bool(self._pending) or bool(self._inflight)

    # ---- what a driver asks of the ranks and the cache (`GroupEngine`) -------------------

    def kv_usage(self) -> KVUsage:
        bm = self._block_manager
        return KVUsage(bm.num_blocks, bm.num_free_blocks, bm.usage, bm.block_size)

    def kv_layout(self) -> KVLayout:
        """What this group's KV blocks look like, for the check against the other side's
        before the KV links connect (`kvtransfer.plan.check_layouts`)."""
        cfg = self.model_cfg
        slices = self._executor.kv_scales()
        fingerprint = (scales_fingerprint(assemble_scales(slices, cfg.num_layers, cfg.num_kv_heads))
                       if slices else None)
        return KVLayout(self.config.cache.block_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                        str(self.kv_dtype).removeprefix("torch."), fingerprint)

    def start_kv_connect(self, routes: list[KVRoute], namespaces: list[str]) -> None:
        self._executor.kv_connect(routes, namespaces)

    def finish_kv_connect(self, timeout_s: float) -> None:
        self._executor.wait_kv_connected(timeout_s)

    def post_kv_receives(self, commands: list[RecvCommand]) -> None:
        self._executor.kv_recv(commands)

    def cancel_kv_receive(self, transfer_id: int) -> None:
        self._executor.kv_cancel(transfer_id)

    def has_transfer_events(self) -> bool:
        return self._executor.has_events()

    def poll_transfer_events(self) -> list[TransferEvent]:
        return self._executor.poll_events()

    def wait_handles(self) -> list:
        return self._executor.wait_handles()

    def poll_ranks(self) -> None:
        """Read what the ranks sent, now (kept for the step): a dead rank raises
        `WorkerGroupError` here rather than at the next step."""
        self._executor.ready()

    @property
    def executor_for_tests(self) -> Executor:
        """Tests and benchmark probes only (rank pids, fault injection, the in-process runner):
        serving code goes through the engine's own methods."""
        return self._executor

    @property
    def block_manager_for_tests(self) -> BlockManager:
        """Tests only (leak checks of every block, prefix-cache probes): see `kv_usage`."""
        return self._block_manager

    @property
    def step_failure(self) -> StepError | None:
        """The step whose exception ended a rank, once one has (rank processes only)."""
        return getattr(self._executor, "step_failure", None)

    # ---- the loop ----------------------------------------------------------------------

    def submit(self) -> None:
        """Send ready micro-batches now (`step` also does): a driver of several groups
        submits to all of them before collecting from any, so their ranks work at once."""
        self._submit_ready()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def in_flight(self) -> bool:
        """A micro-batch is on the ranks."""
        return bool(self._inflight)

    def ready(self) -> bool:
        """`step` would return without waiting on the ranks (it has outputs to give, or the
        oldest batch's result is here); a driver of several groups steps only these."""
        return bool(self._pending) or (bool(self._inflight) and self._guarded(self._executor.ready))

    def step(self) -> list[RequestOutput]:
        self.blamed = {}
        self._submit_ready()  # schedule, launch
        if not self._inflight:
            outputs, self._pending = self._pending, []
            return outputs
        collected = self._collect_oldest()  # wait
        if collected is None:  # the batch raised: its requests are judged, failed ones reported
            outputs, self._pending = self._pending, []
            return outputs
        outputs = self._update(*collected)  # update
        self._collect_dead()
        return outputs

    def _collect_oldest(self) -> tuple[SchedulerOutput, SamplerOutput] | None:
        """The oldest batch and its tokens, for `Scheduler.update_from_output`; None if
        computing it raised (`_step_failed`)."""
        try:
            sampled = self._guarded(self._executor.collect)  # on failure the batch is still listed
        except StepError as err:
            self._step_failed(err)
            return None
        return self._inflight.popleft(), sampled

    def _step_failed(self, err: StepError) -> None:
        """The oldest batch raised on the ranks, which went on serving: judge its requests
        (`_blame`), drop the batches sent after it (they may read what it never wrote), then
        fail the culprit, isolate the suspects and compute everyone again (module doc)."""
        failed = self._inflight.popleft()
        self.scheduler.discard(failed)
        logger.warning("step %d (%d requests) raised on the ranks: %s", failed.step_id, len(failed.scheduled),
                       err.message)
        verdicts = self._blame(err, failed)
        lost = []
        while self._inflight:  # a group failure here ends everything (`fail_all`: verdicts kept)
            try:
                self._guarded(self._executor.collect)
            except StepError:
                pass
            out = self._inflight.popleft()
            self.scheduler.discard(out)
            lost += [seq for seq in self._live(out) if seq.request_id not in verdicts]
        for seq in lost:
            verdicts[seq.request_id] = (seq, Verdict.REQUEUE, f"a batch sent after step {failed.step_id}, which raised, "
                                                        "was dropped with it")
            self.blamed.setdefault(seq.request_id, Blame(Verdict.REQUEUE, verdicts[seq.request_id][2]))
        for seq, verdict, reason in reversed(verdicts.values()):  # requeued to the front: keep their order
            req = self._requests[seq.request_id]
            if verdict is Verdict.CULPRIT or not self._role.generates:  # a prefill group's: re-sent by the driver
                self._fail_request(req, reason, "INTERNAL" if verdict is Verdict.CULPRIT else None)
            else:
                self.scheduler.requeue(seq)
                if verdict is Verdict.SUSPECT:
                    self.scheduler.isolate(seq)

    def _live(self, out: SchedulerOutput) -> list[Sequence]:
        """The batch's sequences that are still this engine's unfinished requests."""
        live = []
        for item in out.scheduled:
            req = self._requests.get(item.seq.request_id)
            if req is not None and req.seq is item.seq and not item.seq.is_finished:
                live.append(item.seq)
        return live

    def _blame(self, err: StepError, out: SchedulerOutput | None) -> dict[str, tuple[Sequence, Verdict, str]]:
        """Judge the requests of the batch that raised (recorded in `blamed` as well): alone in
        it, a request is the culprit; with others (even ones ended since), each is a suspect."""
        if out is None:
            return {}
        alone = len(out.scheduled) == 1
        verdict = Verdict.CULPRIT if alone else Verdict.SUSPECT
        if alone:
            reason = (f"the model raised an exception on this request (alone in its step, so it is the "
                      f"cause); it is failed and not retried: {err.message}")
        else:
            reason = (f"the model raised an exception in a step of {len(out.scheduled)} requests; each is "
                      f"run again alone to find which one caused it: {err.message}")
        verdicts = {seq.request_id: (seq, verdict, reason) for seq in self._live(out)}
        for request_id in verdicts:
            self.blamed[request_id] = Blame(verdict, reason)
        return verdicts

    def _fail_request(self, req: _Request, reason: str, code: str | None) -> None:
        """End the request now with an error (finish_reason "abort"), reported by this step."""
        del self._requests[req.seq.request_id]
        self._role.on_dropped(req.seq.request_id)
        self.scheduler.finish(req.seq, SequenceStatus.FINISHED_ABORTED)
        out = self._output(req)
        out.error, out.error_code = reason, code
        self._pending.append(out)

    def _collect_dead(self) -> None:
        """A batch queued ahead whose every sequence has ended since (a stop token) is taken
        back now, freeing their blocks, rather than waiting for a step nobody may call."""
        while self._inflight and all(item.seq.is_finished for item in self._inflight[0].scheduled):
            collected = self._collect_oldest()
            if collected is not None:
                self.scheduler.update_from_output(*collected)  # ended ones take no token

    def _submit_ready(self) -> None:
        """Schedule and send micro-batches until ``pp`` are in flight (one without pipeline
        parallelism) or no sequence is left to put in one: stages never wait for the driver."""
        pp = self.config.parallel.pipeline_parallel_size
        depth = 2 if self.async_scheduling else pp
        while len(self._inflight) < depth and self.scheduler.has_schedulable():
            cap = None if pp == 1 else -(-self.scheduler.num_unfinished // pp)
            out = self.scheduler.schedule(cap)
            if out.is_empty:
                return
            previous = sampling_rows(self._inflight[-1]) if self._inflight else None
            self._inflight.append(out)  # first: a failing submit must still release its sequences
            out.step_id = next(self._step_ids)
            batch = build_step_batch(out, self._block_manager.block_size, self._role.on_scheduled(out),
                                     out.step_id, previous)
            self._guarded(lambda: self._executor.submit(batch))

    def _guarded(self, call):
        try:
            return call()
        except WorkerGroupError as err:
            self.fail_all(str(err), err.step_failure or getattr(self._executor, "step_failure", None))
            raise

    def fail_all(self, reason: str, step_failure: StepError | None = None) -> None:
        """The group is gone: end every request (blocks back to the pool) and refuse new ones.
        What each request had generated stays in ``lost_outputs`` (to continue it elsewhere);
        when a step's exception ended the group (``step_failure``), its batch's requests are
        judged in `blamed` first (the driver fails the culprit rather than re-send it)."""
        if step_failure is not None and self._failure is None:
            self._blame(step_failure, next((o for o in self._inflight if o.step_id == step_failure.step_id), None))
        self._failure = reason
        self.lost_outputs = ({rid: list(req.seq.output_token_ids) for rid, req in self._requests.items()}
                             if self._role.generates else {})  # a prompt on prefill is re-sent whole
        for out in self._inflight:  # the group is gone: nothing writes these blocks any more
            seqs = [item.seq for item in out.scheduled]
            self.scheduler.forget_in_flight(seqs)
            for seq in seqs:  # ended while in flight (aborted): their blocks waited for this batch
                if seq.is_finished and not self._role.holds(seq.request_id):
                    self.scheduler.free_blocks(seq)
        self._inflight.clear()
        for request_id in list(self._requests):
            self.abort_request(request_id)
        self._role.release_all()
        self._pending = []

    def shutdown(self) -> None:
        self._executor.shutdown()

    def _on_finished(self, seq: Sequence, status: SequenceStatus) -> bool:
        """The scheduler's hook as a sequence finishes: the role keeps its blocks, or not."""
        return self._role.on_finished(seq, status)

    def _update(self, out: SchedulerOutput, sampled: SamplerOutput) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        for update in self.scheduler.update_from_output(out, sampled, self._text_of):
            self._report(self._requests[update.seq.request_id], update.stop, outputs)
        return outputs

    def _text_of(self, seq: Sequence, token: int) -> tuple[str | None, int]:
        """The scheduler's `TextFn`: the request's text with ``token`` decoded, when it is
        followed here (streams, stop strings)."""
        detok = self._requests[seq.request_id].detok
        if detok is None:
            return None, 0
        delta = detok.append([token])
        return detok.text, len(delta)

    def _report(self, req: _Request, stop: StopDecision | None, outputs: list[RequestOutput]) -> None:
        """After a token: a snapshot for streams and finished requests; finished ones are forgotten."""
        if stop is not None:
            req.truncate_to = stop.truncate_to
        if req.stream or req.seq.is_finished:
            outputs.append(self._output(req))
        if req.seq.is_finished:
            del self._requests[req.seq.request_id]

    def _output(self, req: _Request) -> RequestOutput:
        seq = req.seq
        text = self._text(req)
        new_ids = seq.output_token_ids[req.num_sent_tokens:]
        new_text = text[req.num_sent_chars:]
        req.num_sent_tokens, req.num_sent_chars = seq.num_output_tokens, len(text)
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids), text=text, finished=seq.is_finished,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens, new_token_ids=new_ids, new_text=new_text,
            prompt=req.prompt,
        )

    def _text(self, req: _Request) -> str:
        if self.tokenizer is None or not self.config.detokenize:
            return ""
        if req.detok is None:  # decoded once, at the end
            if not req.seq.is_finished:
                return ""
            ids = req.seq.output_token_ids
            # Without stop strings a "stop" is EOS or a stop token id: its own text is not part
            # of the answer, as on the streamed path (`cut_token_text`).
            if req.seq.finish_reason == "stop" and not req.seq.params.include_stop_str_in_output:
                ids = ids[:-1]
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        if req.seq.is_finished:
            req.detok.flush()
            return req.detok.text[: req.truncate_to]
        # Text that may be the start of a stop string is held back until it is decided.
        text = req.detok.text
        return text[: max(0, len(text) - stream_holdback(req.seq.params))]
