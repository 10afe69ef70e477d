"""KVTransferAgent over NCCL between two GPUs (skipped without two): what the CPU tests can't see.

Two spawned processes, a sender on cuda:0 and a receiver on cuda:1, run these in order:

    in flight     transfers whose receives are posted late, so their sends wait in NCCL while
                  the sender packs the next ones: a staging buffer still being sent must not be
                  lent again (the receiver would get the later transfer's bytes)
    busy decode   the receiver's compute stream is kept busy while a transfer arrives: the
                  receive and its writes run on the agent's side stream, not behind that compute
    cancel        a transfer cancelled after its first message was written: once `cancel`
                  returns, nothing of it lands in the blocks (the compute stream overwrites
                  them with a sentinel right after), and the pair still carries the next one

Every received block is checked against the sender's cache, which both sides can compute.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
import traceback
from datetime import timedelta

import pytest
import torch

LAYERS, HEADS, DIM, BS, BLOCKS, PER_MESSAGE = 8, 4, 64, 16, 512, 2
SHAPE = (LAYERS, 2, BLOCKS, BS, HEADS, DIM)
NUM_BLOCKS = 32  # per transfer: 8 x 2 x 32 x 16 x 4 x 64 x 2 B = 4 MiB, 4 messages
SENTINEL = -3.0
TIMEOUT_S = 60.0

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs two CUDA devices")


def _source(device) -> torch.Tensor:
    """The sender's cache; small integers, exact in bfloat16, so the receiver can recompute it."""
    return (torch.arange(torch.Size(SHAPE).numel(), device=device) % 251).reshape(SHAPE).to(torch.bfloat16)


def _blocks(transfer_id: int, side: str) -> list[int]:
    """Distinct, scattered blocks per transfer and side."""
    start = (transfer_id * NUM_BLOCKS) % (BLOCKS - NUM_BLOCKS)
    ids = list(range(start, start + NUM_BLOCKS))
    return ids[::-1] if side == "dst" else ids[1::2] + ids[::2]


def _events(reports: queue.Queue, wanted: set[tuple[str, int]], timeout_s: float) -> dict:
    got, deadline = {}, time.monotonic() + timeout_s
    while wanted - set(got):
        event = reports.get(timeout=max(0.001, deadline - time.monotonic()))
        got[(event.side, event.transfer_id)] = event
    return got


def _run(role: str, port: int, out) -> None:
    try:
        out.put((role, _side(role, port)))
    except BaseException:  # noqa: BLE001 - the parent reports it
        out.put((role, traceback.format_exc()))
    finally:
        out.close()
        out.join_thread()
        os._exit(0)  # no interpreter teardown: process-group destructors must not hang the test


def _side(role: str, port: int) -> str:
    import torch.distributed as dist

    from splitserve.kvtransfer.agent import KVAgentSpec, KVTransferAgent
    from splitserve.kvtransfer.messages import FaultConfig, RecvCommand, SendCommand
    from splitserve.kvtransfer.plan import make_routes
    from splitserve.mapping import Mapping

    device = torch.device("cuda", 0 if role == "prefill" else 1)
    torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=TIMEOUT_S))
    step = [0]

    def barrier() -> None:
        step[0] += 1
        store.set(f"{role}/{step[0]}", b"1")
        store.wait([f"{'decode' if role == 'prefill' else 'prefill'}/{step[0]}"], timedelta(seconds=TIMEOUT_S))

    routes = make_routes(Mapping(1, 0), Mapping(1, 0), LAYERS, HEADS)
    reports: queue.Queue = queue.Queue()
    faults = FaultConfig(delay_transfer=30, delay_s=0.05)
    cache = _source(device) if role == "prefill" else torch.full(SHAPE, SENTINEL, dtype=torch.bfloat16, device=device)
    agent = KVTransferAgent(KVAgentSpec(role, "nccl", "", "127.0.0.1", port, faults, TIMEOUT_S), 0, cache, 0, 0,
                            reports.put)
    agent.connect(routes)
    source = _source(device)

    def send(tid: int) -> None:
        hook = agent.layer_hook([SendCommand(tid, _blocks(tid, "src"), routes, PER_MESSAGE)])
        for layer in range(LAYERS):
            hook(layer)

    def post(tid: int) -> None:
        agent.post_recv([RecvCommand(tid, _blocks(tid, "dst"), routes, PER_MESSAGE)])

    def arrived(tid: int) -> bool:
        dst = torch.tensor(_blocks(tid, "dst"), device=device)
        src = torch.tensor(_blocks(tid, "src"), device=device)
        return torch.equal(cache.index_select(2, dst), source.index_select(2, src))

    if role == "prefill":
        barrier()  # in flight: 1-3 posted; 4-6 posted only after 7 is packed
        for tid in range(1, 8):
            send(tid)
        barrier()
        sent = _events(reports, {("send", t) for t in range(1, 8)}, TIMEOUT_S)
        assert all(e.ok for e in sent.values()), sent
        barrier()  # busy decode
        send(20)
        barrier()  # cancel: 30 is sent slowly, 31 follows on the same pair
        send(30)
        send(31)
        _events(reports, {("send", 20), ("send", 30), ("send", 31)}, TIMEOUT_S)
        barrier()
        return "ok"

    for tid in (1, 2, 3):
        post(tid)
    barrier()
    time.sleep(0.5)  # the sender has packed 4-7 meanwhile; their sends wait for these receives
    for tid in (4, 5, 6, 7):
        post(tid)
    got = _events(reports, {("recv", t) for t in range(1, 8)}, TIMEOUT_S)
    assert all(e.ok for e in got.values()), got
    bad = [t for t in range(1, 8) if not arrived(t)]
    assert not bad, f"transfers {bad} got other bytes than their own"
    barrier()

    busy = torch.randn(8192, 8192, device=device)
    torch.cuda.synchronize(device)
    started = time.monotonic()
    for _ in range(40):  # float32 8192^3 matmuls, some 10-20 ms each, queued on the compute stream
        busy = busy @ busy
        busy /= busy.norm()
    post(20)
    barrier()
    _events(reports, {("recv", 20)}, TIMEOUT_S)
    received_s = time.monotonic() - started
    torch.cuda.synchronize(device)
    busy_s = time.monotonic() - started
    assert arrived(20)
    assert received_s < 0.5 * busy_s, f"received after {received_s:.3f} s of {busy_s:.3f} s of compute"
    barrier()

    post(30)
    post(31)
    time.sleep(0.08)  # the first of 30's four messages (one each 50 ms) has landed
    agent.cancel(30)
    dst = torch.tensor(_blocks(30, "dst"), device=device)
    cache.index_fill_(2, dst, SENTINEL)  # the blocks' next owner, on the compute stream
    got = _events(reports, {("recv", 31)}, TIMEOUT_S)
    assert got[("recv", 31)].ok and arrived(31)
    time.sleep(0.3)  # 30's last messages land (and are drained, not written)
    assert torch.all(cache.index_select(2, dst) == SENTINEL), "a cancelled transfer wrote after cancel"
    with pytest.raises(queue.Empty):
        reports.get(timeout=0.1)  # no report of the cancelled transfer
    barrier()
    return f"ok: received under compute in {received_s * 1e3:.1f} ms of {busy_s * 1e3:.1f} ms"


def test_nccl_transfers_between_two_gpus():
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=TIMEOUT_S), wait_for_workers=False)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_run, args=(role, store.port, out), daemon=True) for role in ("prefill", "decode")]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=3 * TIMEOUT_S) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    print(results)
    assert all(r.startswith("ok") for r in results.values()), results
