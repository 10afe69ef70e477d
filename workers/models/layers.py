"""Tensor-parallel building blocks: column/row-parallel linears, vocab-parallel embedding.

Each layer holds only this rank's shard and knows how to cut it out of a full checkpoint
tensor (`load_shard`), reading just its slice: a rank never materialises the whole model.
With tp_size 1 they are plain linears and the collectives are no-ops.

- Column-parallel: the output dimension is split (q/k/v heads, gate/up); no communication.
  A fused layer (q|k|v, gate|up) stacks several logical outputs, each split on its own.
- Row-parallel: the input dimension is split (o_proj, down_proj); partial sums are
  all-reduced, and the bias is added once, after the sum.
- Vocab-parallel embedding: each rank looks up the ids in its vocabulary range, zeros the
  rest, and the ranks' results are summed. The LM head reuses the sharding: each rank
  computes its vocabulary slice of the logits, then they are gathered.

The linears take an optional quantization method (``quant``; workers/models/quant.py): with
FP8 it allocates their ``weight`` (e4m3) and ``weight_scale``, loads them with their slices and
runs the forward; embeddings and the LM head stay unquantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
import torch.nn.functional as F

from splitserve.kernels import dispatch
from splitserve.kernels.fp8 import Fp8Weight, QuantizedRows
from splitserve.workers.parallel import ParallelState

if TYPE_CHECKING:
    from splitserve.workers.models.quant import Fp8LinearMethod


@dataclass(frozen=True)
class ShardSpec:
    """Which rows of a checkpoint tensor this rank holds for one logical output."""

    #: Row range in the full checkpoint tensor.
    src_start: int
    size: int
    #: Row offset in this rank's fused parameter.
    dst_start: int


def _read_rows(tensor, start: int, size: int) -> torch.Tensor:
    # Works for a real tensor and for a lazy safetensors slice (reads only those rows).
    return tensor[start : start + size]


def _read_cols(tensor, start: int, size: int) -> torch.Tensor:
    return tensor[:, start : start + size]


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) for this rank's rows of W; the logical outputs are given as shards."""

    def __init__(self, in_features: int, shards: list[ShardSpec], bias: bool, quant: Fp8LinearMethod | None = None):
        super().__init__()
        self.shards = shards
        self.quant = quant
        out_features = sum(s.size for s in shards)
        if quant is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
        else:
            quant.check_block_alignment(type(self).__name__, [(s.src_start, s.dst_start, s.size) for s in shards],
                                        out_features, "rows")
            quant.create_weights(self, out_features, in_features)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        """``x`` quantized per token already (`QuantizedRows`) only for FP8 weights."""
        if self.quant is not None:
            return self.quant.apply(self, x, self.bias)
        return dispatch.linear(x, self.weight, self.bias)

    def fp8_weight(self) -> Fp8Weight | None:
        """The e4m3 weight and its scales (None: not FP8), for the RMSNorm before to quantize for."""
        return None if self.quant is None else self.quant.weight(self)

    def load_shard(self, param_name: str, shard: int, tensor) -> None:
        spec = self.shards[shard]
        if self.quant is not None and param_name != "bias":
            src = range(spec.src_start, spec.src_start + spec.size)
            self.quant.load_column(self, param_name, shard, tensor, src, range(spec.dst_start, spec.dst_start + spec.size))
            return
        dest = getattr(self, param_name).data.narrow(0, spec.dst_start, spec.size)
        _copy_checked(dest, _read_rows(tensor, spec.src_start, spec.size), f"{param_name}[{shard}]")


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard W_shard^T) + b: input columns [in_start, in_start + in_size)."""

    def __init__(self, in_start: int, in_size: int, out_features: int, bias: bool, parallel: ParallelState,
                 quant: Fp8LinearMethod | None = None):
        super().__init__()
        self.in_start = in_start
        self.parallel = parallel
        self.quant = quant
        if quant is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_size))
        else:
            quant.check_block_alignment(type(self).__name__, [(in_start, 0, in_size)], in_size, "columns")
            quant.create_weights(self, out_features, in_size)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = dispatch.linear(x, self.weight) if self.quant is None else self.quant.apply(self, x, None)
        y = self.parallel.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def load_shard(self, param_name: str, shard: int, tensor) -> None:
        if param_name == "bias":  # replicated: added once after the sum
            _copy_checked(self.bias.data, tensor[:], "bias")
            return
        if self.quant is not None:
            cols = range(self.in_start, self.in_start + self.weight.shape[1])
            self.quant.load_row(self, param_name, tensor, cols)
            return
        cols = _read_cols(tensor, self.in_start, self.weight.shape[1])
        _copy_checked(self.weight.data, cols, "weight")


class VocabParallelEmbedding(nn.Module):
    """Embedding rows [vocab_start, vocab_start + shard) of a vocabulary padded to tp * shard."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelState):
        super().__init__()
        tp = parallel.tp_size
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp)
        self.vocab_start = parallel.mapping.tp_rank * self.shard_size
        self.num_real = max(0, min(self.shard_size, vocab_size - self.vocab_start))
        self.parallel = parallel
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_real)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.parallel.all_reduce(out)

    def load_shard(self, param_name: str, shard: int, tensor) -> None:
        self.weight.data[self.num_real :].zero_()  # padding rows of the last shard
        dest = self.weight.data[: self.num_real]
        _copy_checked(dest, _read_rows(tensor, self.vocab_start, self.num_real), "weight")

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Full-vocabulary float32 logits from this shard's slice (gathered over tp)."""
        local = F.linear(hidden, self.weight if weight is None else weight).float()
        return self.parallel.all_gather_last_dim(local)[:, : self.vocab_size]


def _copy_checked(dest: torch.Tensor, src, what: str) -> None:
    src = src if isinstance(src, torch.Tensor) else torch.as_tensor(src)
    if tuple(dest.shape) != tuple(src.shape):
        raise ValueError(f"shape mismatch loading {what}: model shard {tuple(dest.shape)}, checkpoint slice {tuple(src.shape)}")
    dest.copy_(src)
