"""Offline API: `LLM(model).generate(prompts, params)` and `LLM.chat(messages, params)`.

The same engine the servers use, driven to completion in this process: every request is
validated before any is queued (bad input raises ValueError and leaves the engine as it
was), then the engine steps until all are done, with a progress bar.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import replace
from typing import Any

from splitserve.kvtransfer.messages import FaultConfig
from splitserve.workers.config import CacheConfig, ParallelConfig, SchedulerConfig
from splitserve.workers.disagg_engine import DisaggConfig, DisaggEngine
from splitserve.workers.engine import EngineConfig, LLMEngine
from splitserve.workers.outputs import RequestOutput
from splitserve.workers.roles import FailurePolicy, Mode
from splitserve.workers.sampling_params import SamplingParams
from tqdm.auto import tqdm

Prompt = str | list[int]


class LLM:
    """An engine in this process.

    Args:
        model: None (the default model, SmolLM2-135M-Instruct), a local Hugging Face folder,
            or ``random:<name>`` (random weights of a named shape, token-id prompts).
        mode: "aggregated" (one group prefills and decodes) or "disaggregated": a prefill group
            (prefill_tp x prefill_pp) and a decode group (decode_tp x decode_pp), KV moved
            between them by the cache-transmission service (``transfer_timeout_s``,
            ``failure_policy`` "recompute" or "fail", ``faults`` for tests).
        tensor_parallel_size / pipeline_parallel_size: run as a worker group of tp x pp rank
            processes (gloo on CPU, NCCL on GPU); 1 x 1 runs in this process.
        expert_parallel: mixture-of-experts models hold whole experts per tp rank instead of
            every expert's slice (`ParallelConfig.expert_parallel`), in every group.
        quantization: None, or "fp8": FP8 weights (a float checkpoint quantized at load; an
            FP8 checkpoint loads as its config.json says either way).
        num_kv_blocks / kv_cache_memory: the KV budget, in blocks or bytes (per rank).
        kv_cache_dtype: "auto" (the model's dtype) or "fp8" (float8_e4m3fn with per-head
            scales: twice the blocks in the same bytes; `EngineConfig.kv_cache_dtype`).
        Other arguments: see `EngineConfig`, `CacheConfig`, `SchedulerConfig`.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        mode: Mode | str = Mode.AGGREGATED,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        expert_parallel: bool = False,
        prefill_tp: int = 1,
        prefill_pp: int = 1,
        decode_tp: int = 1,
        decode_pp: int = 1,
        transfer_timeout_s: float = 30.0,
        failure_policy: FailurePolicy | str = FailurePolicy.RECOMPUTE,
        faults: FaultConfig | None = None,
        device: str = "auto",
        dtype: str = "auto",
        kv_cache_dtype: str = "auto",
        quantization: str | None = None,
        max_model_len: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int = 2 * 1024**3,
        enable_prefix_caching: bool = True,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        enable_chunked_prefill: bool = True,
        async_scheduling: bool | None = None,
        seed: int = 0,
        show_progress: bool = True,
    ):
        if mode not in (Mode.AGGREGATED, Mode.DISAGGREGATED):  # auto is the server's: it needs a cluster
            raise ValueError(f"mode must be 'aggregated' or 'disaggregated', got {mode!r}")
        config = EngineConfig(
            model=model, device=device, dtype=dtype, quantization=quantization, max_model_len=max_model_len, seed=seed,
            kv_cache_dtype=kv_cache_dtype,
            cache=CacheConfig(block_size, num_kv_blocks, kv_cache_memory, enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_batched_tokens, max_num_seqs, enable_chunked_prefill, async_scheduling),
            parallel=ParallelConfig(tensor_parallel_size, pipeline_parallel_size, expert_parallel=expert_parallel),
            show_progress=show_progress,
        )
        if mode == Mode.AGGREGATED:
            self.engine = LLMEngine(config)
        else:
            self.engine = DisaggEngine(DisaggConfig(
                prefill=replace(config, parallel=ParallelConfig(prefill_tp, prefill_pp, expert_parallel=expert_parallel)),
                decode=replace(config, parallel=ParallelConfig(decode_tp, decode_pp, expert_parallel=expert_parallel)),
                transfer_timeout_s=transfer_timeout_s, failure_policy=failure_policy,
                faults=faults or FaultConfig(),
            ))
        self.show_progress = show_progress

    @classmethod
    def from_engine(cls, engine: LLMEngine | DisaggEngine, show_progress: bool = False) -> "LLM":
        """Wrap an engine built by hand (e.g. a `DisaggEngine` with its own `DisaggConfig`)."""
        llm = cls.__new__(cls)
        llm.engine, llm.show_progress = engine, show_progress
        return llm

    def shutdown(self) -> None:
        """Stop the worker group's rank processes (also done when the LLM is collected)."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); outputs in prompt order."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        token_ids = [self.engine.tokenize(p) for p in prompts]
        for ids, p in zip(token_ids, params):
            self.engine.validate(ids, p)
        request_ids = [
            self.engine.add_request(None, ids, p, prompt=text if isinstance(text, str) else None)
            for ids, p, text in zip(token_ids, params, prompts)
        ]
        return self._run(request_ids, self.show_progress if use_tqdm is None else use_tqdm)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [chat_prompt_ids(tokenizer, c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while len(done) < len(request_ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[r] for r in request_ids]


def chat_prompt_ids(tokenizer: Any, conversation: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """The conversation rendered with the model's chat template, as token ids."""
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True)
    # transformers 5 returns a BatchEncoding here, 4.x a plain list.
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _as_params_list(params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return params
