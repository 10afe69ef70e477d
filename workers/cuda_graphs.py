"""CUDA graphs of decode-only steps: capture once per batch-size bucket, replay every step.

A decode step of a small batch is launch-bound (hundreds of small kernels for a few
microseconds of work each); replaying a captured graph removes the launch gaps. Lifecycle:

1. `DecodeGraphs.capture` (once, at runner start-up, after the KV cache exists): for each
   bucket b (1, 2, 4, ..., up to ``max_batch``, largest first so that the smaller ones reuse
   its memory pool) the model's forward runs twice eagerly on the static input buffers (warm-up:
   Triton compiles, cuBLAS picks its kernels), then once under `torch.cuda.graph`.
2. Per step, `DecodeGraphs.run(inputs)` for a decode-only batch of n <= max bucket rows: the
   step's inputs are copied into the first n rows of the static buffers, the rows n..b of the
   smallest bucket b >= n are padding, and the graph of b replays; the first n rows of its
   output buffer are the step's hidden states (valid until the next replay).

Static buffers: token ids, positions, cache slots, context lengths [max_batch] and block tables
[max_batch, max_blocks_per_seq], int64. Padding rows attend one key in a *scratch block* (an
extra block past the ones the block manager hands out, see `ModelRunner`) and write their K/V
there, so they never touch a sequence's cache. Block table columns past a row's context hold
stale ids; they are masked by the context length. The paged decode kernel sizes its grid from
the table's width (``max_blocks_per_seq * block_size``), never from the context lengths'
values, so one capture serves every context length.

Graphs are used only where they are safe and pay: CUDA, one rank (no tp/pp collectives in the
graph), the Triton kernels (the torch reference would gather every padded block each step),
and not when ``SPLITSERVE_ENFORCE_EAGER=1``. Everything else runs eagerly, as before.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from splitserve.workers.models.attention import AttentionMetadata

ENFORCE_EAGER_ENV = "SPLITSERVE_ENFORCE_EAGER"
MAX_BATCH_ENV = "SPLITSERVE_CUDA_GRAPH_MAX_BATCH"


@dataclass(frozen=True)
class CudaGraphConfig:
    #: Run every step eagerly (no capture at all).
    enforce_eager: bool = False
    #: The largest decode batch captured; larger batches run eagerly.
    max_batch: int = 256

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"{MAX_BATCH_ENV} must be >= 1, got {self.max_batch}")

    @classmethod
    def from_env(cls) -> "CudaGraphConfig":
        eager = os.environ.get(ENFORCE_EAGER_ENV, "0").strip().lower() in ("1", "true", "yes")
        return cls(enforce_eager=eager, max_batch=int(os.environ.get(MAX_BATCH_ENV, "256")))


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, ... below ``max_batch``, then ``max_batch`` itself: ascending."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return buckets + [max_batch]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding ``n`` rows, or None if none does."""
    return next((b for b in buckets if b >= n), None)


@dataclass(frozen=True)
class DecodeInputs:
    """One decode-only step's inputs on the device: n rows, tables [n, w] with w <= max width."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_layers: list, device: torch.device, max_batch: int,
                 max_blocks_per_seq: int, scratch_block: int, block_size: int):
        self.model = model
        self.kv_layers = kv_layers
        self.device = device
        self.buckets = batch_buckets(max_batch)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        n = self.buckets[-1]
        i64 = {"dtype": torch.int64, "device": device}
        # Until a step overwrites them, every row is a padding row (the capture's inputs too).
        self.input_ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.slot_mapping = torch.full((n,), self.scratch_slot, **i64)
        self.context_lens = torch.ones(n, **i64)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, **i64)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _metadata(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:b], num_decode=b,
                                 decode_block_tables=self.block_tables[:b], decode_context_lens=self.context_lens[:b],
                                 prefills=())

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.input_ids[:b], self.positions[:b], self.kv_layers, self._metadata(b))

    @torch.inference_mode()
    def capture(self, log: bool = False) -> None:
        pool = None
        for b in reversed(self.buckets):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(b)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize(self.device)
        if log:
            print(f"captured decode CUDA graphs for batch sizes {self.buckets}", file=sys.stderr, flush=True)

    def fits(self, num_rows: int, table_width: int) -> bool:
        return 0 < num_rows <= self.buckets[-1] and table_width <= self.max_blocks_per_seq

    def run(self, inputs: DecodeInputs) -> torch.Tensor:
        """Replay the bucket's graph on ``inputs``; returns the n rows' hidden states (a view
        of the graph's output, overwritten by the next replay)."""
        n, width = inputs.block_tables.shape
        b = bucket_for(n, self.buckets)
        self.input_ids[:n].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:n].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(inputs.slot_mapping, non_blocking=True)
        self.context_lens[:n].copy_(inputs.context_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(inputs.block_tables, non_blocking=True)
        if b > n:  # rows a previous, larger step left behind become padding again
            self.slot_mapping[n:b].fill_(self.scratch_slot)
            self.context_lens[n:b].fill_(1)
            self.block_tables[n:b, 0].fill_(self.scratch_block)
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]
