"""Fakes shared by the kvtransfer tests (a plain module: several folders have a conftest):
messages that the test completes by hand, and the small cache shape the tests move.

`FakeTorchWork` stands for a work of torch's NCCL process group (what `transport.CudaWork`
wraps); `ManualTransport` is a whole transport whose every message the test delivers and
completes itself, so the tests can hold a send or a receive in flight and look at what the
agent does meanwhile (on CPU, the same logic the CUDA path runs).
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch

from splitserve.kvtransfer.plan import make_routes
from splitserve.mapping import Mapping

#: The tests' cache: layers, KV heads, head dim, blocks, block size.
LAYERS, HEADS, DIM, BLOCKS, BS = 4, 2, 8, 12, 4
#: One prefill rank to one decode rank: a single route of every layer and head.
ROUTES = make_routes(Mapping(1, 0), Mapping(1, 0), LAYERS, HEADS)


def make_cache(seed: int | None) -> torch.Tensor:
    """A rank's cache: random (a sender's) or zeros (a receiver's)."""
    shape = (LAYERS, 2, BLOCKS, BS, HEADS, DIM)
    if seed is None:
        return torch.zeros(shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run_forward(sender, transfer_id: int, blocks: list[int], per_message: int = 3) -> None:
    """What a forward does for one transfer: the layer hook after every layer."""
    from splitserve.kvtransfer.messages import SendCommand

    hook = sender.layer_hook([SendCommand(transfer_id, blocks, ROUTES, per_message)])
    for layer in range(LAYERS):
        hook(layer)


def until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class FakeTorchWork:
    """torch's work: ``is_completed`` never blocks; ``wait()`` raises the message's error, and
    with a timeout first blocks the host until the message is done (or raises past it)."""

    def __init__(self):
        self.done, self.error, self.num_waits = threading.Event(), None, 0

    def is_completed(self) -> bool:
        return self.done.is_set()

    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        self.num_waits += 1
        if timeout and not self.done.wait(timeout.total_seconds()):
            raise RuntimeError("timed out in blocking wait")
        if self.error is not None:
            raise self.error
        return True

    def finish(self, error: Exception | None = None) -> None:
        self.error = error
        self.done.set()


class ManualWork:
    """One message of `ManualTransport`: completed (or failed) when the test says so."""

    def __init__(self, tensor: torch.Tensor, peer: str = "", tag: int = 0):
        self.tensor, self.peer, self.tag = tensor, peer, tag
        self.sent = tensor.clone()  # what the buffer held when the message was sent
        self._finished = threading.Event()
        self.error: Exception | None = None

    def deliver(self, data: torch.Tensor | None = None, error: Exception | None = None) -> None:
        if data is not None:
            self.tensor.copy_(data)
        self.error = error
        self._finished.set()

    def is_completed(self) -> bool:
        return self._finished.is_set() and self.error is None

    def wait(self, timeout: timedelta) -> None:
        if not self._finished.wait(timeout.total_seconds()):
            raise TimeoutError("no message")
        if self.error is not None:
            raise self.error


class ManualTransport:
    """Records every send and receive (each `ManualWork` knows its peer and tag); nothing moves
    until the test delivers it."""

    def __init__(self):
        self.sends: list[ManualWork] = []
        self.recvs: list[ManualWork] = []

    def connect(self, peers: list[str]) -> None:
        pass

    def send(self, tensor: torch.Tensor, peer: str, tag: int) -> ManualWork:
        self.sends.append(ManualWork(tensor, peer, tag))
        return self.sends[-1]

    def recv(self, tensor: torch.Tensor, peer: str, tag: int) -> ManualWork:
        self.recvs.append(ManualWork(tensor, peer, tag))
        return self.recvs[-1]
