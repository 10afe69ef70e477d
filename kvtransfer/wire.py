"""What both ends of a transfer derive on their own, without talking: who their peers are, the
messages a transfer is cut into, each message's tag, the order they go out in, and where in a
rank's cache each message's bytes live.

A transfer (`SendCommand` / `RecvCommand`) has routes (`KVRoute`: one source rank, one
destination rank, a rectangle of layers x KV heads). Each route is cut into *layer chunks* of
`layers_per_message` layers; one chunk of one route is one `KVMessage`. The sender sends a
message right after the forward computed its chunk's last layer; the receiver posts its
receives in the same `message_order`, which NCCL needs (it matches a pair's messages by order,
gloo by tag). "Chunk" and not "group": the rest of the project says group for worker groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from splitserve.kvtransfer.messages import KVRoute, RecvCommand, SendCommand, Side


def peer_name(side: Side, rank: int, namespace: str = "") -> str:
    """A rank's name on the transports: its group's namespace, P or D, its rank."""
    return f"{namespace}{'P' if side == Side.PREFILL else 'D'}{rank}"


def link_peers(side: Side, rank: int, routes: Iterable[KVRoute], namespaces: list[str]) -> list[str]:
    """The ranks of the other side (in each of its groups, named by namespace) that this rank
    exchanges KV with, sorted: the links it connects at start-up."""
    if side == Side.PREFILL:
        ranks = {r.dst_rank for r in routes if r.src_rank == rank}
    else:
        ranks = {r.src_rank for r in routes if r.dst_rank == rank}
    return sorted({peer_name(side.other, r, ns) for r in ranks for ns in namespaces})


def layer_chunks(layers: range, per_message: int) -> list[range]:
    """``layers`` cut into runs of ``per_message`` (the last may be shorter)."""
    return [range(s, min(s + per_message, layers.stop)) for s in range(layers.start, layers.stop, per_message)]


def message_tag(transfer_id: int, chunk: range) -> int:
    # One route per (src, dst) pair, so the transfer and the chunk's first layer are unique;
    # wrapped to stay a C int (ids 2**19 apart never share a pair's queue at once).
    return (transfer_id % (1 << 19)) * 4096 + chunk.start


@dataclass(frozen=True, eq=False)
class KVMessage:
    """One message of a transfer: one layer chunk of one of its routes."""

    command: SendCommand | RecvCommand
    route: KVRoute
    #: The layer chunk (global layer indices).
    chunk: range

    @property
    def transfer_id(self) -> int:
        return self.command.transfer_id

    @property
    def tag(self) -> int:
        return message_tag(self.command.transfer_id, self.chunk)

    @property
    def last_layer(self) -> int:
        """The layer after which the sender sends it."""
        return self.chunk.stop - 1


def message_order(cmds: list[SendCommand] | list[RecvCommand], keep: Callable[[KVRoute], bool]) -> list[KVMessage]:
    """The order messages go out in (and, per pair, are received in): by the layer after which
    they are sent, then by the command's place in its step. Both sides compute it."""
    messages = [KVMessage(cmd, route, chunk)
                for cmd in cmds
                for route in cmd.routes if keep(route)
                for chunk in layer_chunks(route.layers, cmd.layers_per_message)]
    return sorted(messages, key=lambda m: m.last_layer)  # stable: ties keep the commands' order


class RankKV:
    """This rank's KV cache, addressed by global layers and heads: where a message's bytes are."""

    def __init__(self, data: torch.Tensor, layer_start: int, head_start: int):
        #: [layers, 2, blocks, block_size, kv_heads, head_dim] of this rank.
        self.data = data
        #: The global index of this rank's first layer and first KV head.
        self.layer_start, self.head_start = layer_start, head_start

    @property
    def device(self) -> torch.device:
        return self.data.device

    def view(self, message: KVMessage) -> torch.Tensor:
        """The (layers, heads) view of the cache that ``message`` carries (every block)."""
        layers = slice(message.chunk.start - self.layer_start, message.chunk.stop - self.layer_start)
        heads = slice(message.route.heads.start - self.head_start, message.route.heads.stop - self.head_start)
        return self.data[layers][:, :, :, :, heads]

    def message_shape(self, message: KVMessage, num_blocks: int) -> tuple[int, ...]:
        """The shape of ``message`` carrying ``num_blocks`` blocks."""
        _, two, _, block_size, _, head_dim = self.data.shape
        return (len(message.chunk), two, num_blocks, block_size, len(message.route.heads), head_dim)
