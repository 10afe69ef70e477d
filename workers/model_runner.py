"""Model runner: turns a `SchedulerOutput` into one forward pass and sampled tokens.

Lifecycle: built once per worker (model allocated, weights loaded or random, KV cache
allocated); then per step `run(out)` lays the scheduled tokens out flat — decode rows
first, then prefill chunks — builds the attention metadata (cache slots, block tables),
runs the model, computes logits only for the rows that sample, and samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.workers.config import ModelConfig
from splitserve.workers.kv_cache import KVCache, KVCacheSpec
from splitserve.workers.models.attention import AttentionMetadata, PrefillChunk
from splitserve.workers.models.registry import build_model
from splitserve.workers.sampler import Sampler, SamplerOutput, SampleRequest
from splitserve.workers.scheduler import ScheduledSeq, SchedulerOutput


@dataclass(frozen=True)
class StepInputs:
    """Tensors of one forward pass."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    #: Row of each sampling sequence's last token in the flattened batch.
    logits_indices: torch.Tensor
    sampling: list[ScheduledSeq]


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, model: torch.nn.Module, kv_spec: KVCacheSpec, device: torch.device,
                 eos_token_ids: tuple[int, ...]):
        self.model_cfg = model_cfg
        self.eos_token_ids = eos_token_ids
        self.model = model
        self.device = device
        self.block_size = kv_spec.block_size
        self.kv_cache = KVCache(kv_spec, device)
        self.kv_layers = self.kv_cache.layers()
        self.sampler = Sampler()

    @classmethod
    def create(cls, model_cfg: ModelConfig, kv_spec: KVCacheSpec, device: torch.device,
               eos_token_ids: tuple[int, ...], weights=None, seed: int = 0):
        """Build the model and load ``weights`` (named tensors), or random weights if None."""
        model = build_model(model_cfg, device, kv_spec.dtype)
        if weights is None:
            model.init_random(seed)
        else:
            model.load_weights(weights)
        return cls(model_cfg, model, kv_spec, device, eos_token_ids)

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> SamplerOutput:
        inputs = self.prepare(out)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_layers, inputs.meta)
        if not inputs.sampling:
            return SamplerOutput(token_ids=[], logprobs=[])
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        return self.sampler(logits, [self._sample_request(s) for s in inputs.sampling])

    def _sample_request(self, item: ScheduledSeq) -> SampleRequest:
        seq = item.seq
        return SampleRequest(seq.params, seq.generator, seq.num_output_tokens, self.eos_token_ids)

    # ---- input preparation ---------------------------------------------------------------

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        chunks: list[PrefillChunk] = []
        for item in out.scheduled:
            start, seq = len(ids), item.seq
            first = seq.num_computed_tokens
            ids += seq.token_slice(first, first + item.num_new_tokens)
            positions += range(first, first + item.num_new_tokens)
            slots += self._slots(seq.block_ids, first, item.num_new_tokens)
            if item.samples:
                logits_rows.append(len(ids) - 1)
            if start >= len(out.decodes):
                chunks.append(PrefillChunk(start, item.num_new_tokens, first + item.num_new_tokens,
                                           self._tensor(seq.block_ids)))
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            num_decode=len(out.decodes),
            decode_block_tables=self._decode_tables(out.decodes),
            decode_context_lens=self._tensor([s.seq.num_computed_tokens + 1 for s in out.decodes]),
            prefills=tuple(chunks),
        )
        return StepInputs(self._tensor(ids), self._tensor(positions), meta,
                          self._tensor(logits_rows), [s for s in out.scheduled if s.samples])

    def _slots(self, block_ids: list[int], first: int, count: int) -> list[int]:
        bs = self.block_size
        return [block_ids[p // bs] * bs + p % bs for p in range(first, first + count)]

    def _decode_tables(self, decodes: list[ScheduledSeq]) -> torch.Tensor | None:
        if not decodes:
            return None
        width = max(-(-(s.seq.num_computed_tokens + 1) // self.block_size) for s in decodes)
        # Padding points at block 0: those slots lie beyond each row's context and are masked.
        rows = [s.seq.block_ids[:width] + [0] * (width - min(width, len(s.seq.block_ids))) for s in decodes]
        return self._tensor(rows)

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)
