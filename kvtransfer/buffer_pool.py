"""Staging buffers for KV messages, reused across messages of any shape (thread-safe).

Lifecycle of a buffer: `BufferPool.take` lends a view of the asked shape on a flat buffer at
least that large (a fresh one when none is free: a pack never waits); the message is packed or
received into it; `give` hands it back together with the work that may still read or write it.
It is lent again only once that work `is_completed` (for NCCL, its end event has passed: asked
without blocking), so no host thread waits for a send before its buffer can return, and no
pack overwrites bytes NCCL still reads. A buffer whose message failed is `forget`-ten: never
lent again, since the transport may still use it. Free buffers beyond `keep_bytes` (or
`max_free` of them) go back to the allocator, oldest first, completed ones only.

A buffer fits a request of n elements when it holds n to 2n: prompts of nearby lengths share
buffers, and memory stays bounded however many shapes come by. Reuse is the point: a fresh
buffer per message costs page faults (CPU) or allocator calls on the hot path.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from splitserve.kvtransfer.transport import Work


@dataclass(eq=False)
class _Staging:
    """One flat buffer of the pool and what it knows about its last use (owned by the pool,
    changed under its lock only)."""

    flat: torch.Tensor
    #: The work that may still use the buffer; None once it has completed (or there was none).
    work: Work | None = None
    #: The view last lent: kept, as a buffer mostly serves one shape.
    view: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        """Its work has completed (remembered, so the work is asked at most until then)."""
        if self.work is not None and self.work.is_completed():
            self.work = None
        return self.work is None

    @property
    def nbytes(self) -> int:
        return nbytes(self.flat)


class BufferPool:
    def __init__(self, dtype: torch.dtype, device: torch.device, keep_bytes: int = 1 << 30, max_free: int = 64):
        self.dtype, self.device = dtype, device
        self.keep_bytes, self.max_free = keep_bytes, max_free
        self._free: list[_Staging] = []  # oldest first
        self._free_bytes = 0
        self._lent: dict[int, _Staging] = {}  # data_ptr of a lent view -> its buffer
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        with self._lock:
            staging = self._take_free(max(1, numel))  # never empty: a lent buffer's address is its key
        if staging is None:
            staging = _Staging(torch.empty(_capacity(max(1, numel)), dtype=self.dtype, device=self.device))
        if staging.view is None or staging.view.shape != shape:
            staging.view = staging.flat[:numel].view(shape)
        with self._lock:
            self._lent[staging.view.data_ptr()] = staging
        return staging.view

    def give(self, buf: torch.Tensor, work: Work | None = None) -> None:
        """Take ``buf`` back; it is reused once ``work`` (None: nothing) has completed."""
        with self._lock:
            staging = self._lent.pop(buf.data_ptr(), None)
            if staging is not None:
                staging.work = work
                self._free.append(staging)
                self._free_bytes += staging.nbytes
                self._trim()

    def forget(self, buf: torch.Tensor) -> None:
        """Never lend ``buf`` again (its message failed: the transport may still use it)."""
        with self._lock:
            self._lent.pop(buf.data_ptr(), None)
            gone = [i for i, s in enumerate(self._free) if s.flat.data_ptr() == buf.data_ptr()]
            for i in reversed(gone):
                self._drop(i)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def _take_free(self, numel: int) -> _Staging | None:
        """The oldest free buffer that fits, if its work has completed. Only that one is asked
        (asking torch costs, and a pair's messages end in order: a newer one is no further);
        one still in flight goes to the back, so a stuck one holds up no other."""
        for i, staging in enumerate(self._free):
            if numel <= staging.flat.numel() <= 2 * numel:
                if staging.ready:
                    return self._drop(i)
                self._free.append(self._free.pop(i))
                return None
        return None

    def _trim(self) -> None:
        while len(self._free) > self.max_free or self._free_bytes > self.keep_bytes:
            done = next((i for i, s in enumerate(self._free) if s.ready), None)
            if done is None:
                return  # the rest are still in flight: freed once they have completed
            self._drop(done)

    def _drop(self, index: int) -> _Staging:
        staging = self._free.pop(index)  # by place: buffers hold tensors, `==` would compare them
        self._free_bytes -= staging.nbytes
        return staging


def _capacity(numel: int) -> int:
    """Round up to one of 8 to 16 sizes per power of two: at most 1/8 more than asked."""
    step = 1 << max(0, numel.bit_length() - 4)
    return -(-numel // step) * step


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
