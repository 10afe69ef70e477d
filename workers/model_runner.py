"""Model runner: one rank's forward pass for a `StepBatch`, and sampling on the output rank.

Lifecycle: built once per rank (this rank's shard of the model, weights loaded or random,
its share of the KV cache allocated); then per step `execute(batch)`: tensors from the plain
batch, attention metadata, the forward of this pipeline stage (receiving activations from
the previous stage, sending to the next), and on the last stage the logits of the rows that
sample. The *output rank* (last stage, tp rank 0) samples and returns the tokens; every other
rank returns None.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from splitserve.workers.config import ModelConfig
from splitserve.workers.kv_cache import KVCache, KVCacheSpec
from splitserve.workers.models.attention import AttentionMetadata, PrefillChunk
from splitserve.workers.models.registry import build_model
from splitserve.workers.parallel import ParallelState
from splitserve.workers.sampler import Sampler, SamplerOutput, SampleRequest, make_generator
from splitserve.workers.step_batch import StepBatch


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, model: torch.nn.Module, parallel: ParallelState,
                 kv_spec: KVCacheSpec, device: torch.device, eos_token_ids: tuple[int, ...]):
        self.model_cfg = model_cfg
        self.model = model
        self.parallel = parallel
        self.device = device
        self.dtype = kv_spec.dtype
        self.eos_token_ids = eos_token_ids
        self.kv_cache = KVCache(kv_spec, device)
        self.kv_layers = self.kv_cache.layers()
        self.sampler = Sampler()
        m = parallel.mapping
        self.is_output_rank = m.is_last_pp_rank and m.tp_rank == 0
        #: The rank's side of the KV transfer service (disaggregated mode), set by the executor.
        self.agent = None

    @classmethod
    def create(cls, model_cfg: ModelConfig, parallel: ParallelState, kv_spec: KVCacheSpec, device: torch.device,
               eos_token_ids: tuple[int, ...], weights: Iterable[tuple[str, Any]] | None = None, seed: int = 0):
        """Build this rank's model and load ``weights`` (named tensors), or random weights if None."""
        model = build_model(model_cfg, parallel, device, kv_spec.dtype)
        if weights is None:
            model.init_random(seed)
        else:
            model.load_weights(weights)
        return cls(model_cfg, model, parallel, kv_spec, device, eos_token_ids)

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> SamplerOutput | None:
        if not batch.num_tokens:
            return SamplerOutput([], []) if self.is_output_rank else None
        hidden = self._forward(batch)
        if hidden is None:
            return None  # an earlier pipeline stage: activations went on to the next
        logits = self.model.compute_logits(hidden[self._tensor(batch.logits_indices)])
        if not self.is_output_rank:
            return None
        return self.sampler(logits, [self._sample_request(row) for row in batch.sample_rows])

    def _forward(self, batch: StepBatch) -> torch.Tensor | None:
        m, model = self.parallel.mapping, self.model
        intermediate = None
        if not m.is_first_pp_rank:
            shape = (batch.num_tokens, self.model_cfg.hidden_size)
            intermediate = tuple(self.parallel.recv_prev([shape, shape], self.dtype, self.device))
        hook = self.agent.layer_hook(batch.kv_sends) if self.agent and batch.kv_sends else None
        out = model(self._tensor(batch.input_ids), self._tensor(batch.positions), self.kv_layers,
                    self._metadata(batch), intermediate, hook)
        if not m.is_last_pp_rank:
            self.parallel.send_next(list(out))
            return None
        return out

    def _metadata(self, batch: StepBatch) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._tensor(batch.slot_mapping),
            num_decode=batch.num_decode,
            decode_block_tables=self._tensor(batch.decode_block_tables) if batch.num_decode else None,
            decode_context_lens=self._tensor(batch.decode_context_lens) if batch.num_decode else None,
            prefills=tuple(PrefillChunk(c.start, c.num_tokens, c.context_len, self._tensor(c.block_ids))
                           for c in batch.prefills),
        )

    def _sample_request(self, row) -> SampleRequest:
        generator = make_generator(row.params.seed, self.device, row.num_output_tokens)
        return SampleRequest(row.params, generator, row.num_output_tokens, self.eos_token_ids)

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)
