"""Fakes shared by the kvtransfer tests (a plain module: several folders have a conftest):
messages that the test completes by hand.

`FakeTorchWork` stands for a work of torch's NCCL process group (what `transport.CudaWork`
wraps); `ManualTransport` is a whole transport whose every message the test delivers and
completes itself, so the tests can hold a send or a receive in flight and look at what the
agent does meanwhile (on CPU, the same logic the CUDA path runs).
"""

from __future__ import annotations

import threading
from datetime import timedelta

import torch


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

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
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
    """Records every send and receive; nothing moves until the test delivers it."""

    def __init__(self):
        self.sends: list[ManualWork] = []
        self.recvs: list[ManualWork] = []

    def connect(self, peers: list[str]) -> None:
        pass

    def send(self, tensor: torch.Tensor, peer: str, tag: int) -> ManualWork:
        self.sends.append(ManualWork(tensor))
        return self.sends[-1]

    def recv(self, tensor: torch.Tensor, peer: str, tag: int) -> ManualWork:
        self.recvs.append(ManualWork(tensor))
        return self.recvs[-1]
