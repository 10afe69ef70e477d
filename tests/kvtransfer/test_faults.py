"""kvtransfer/faults.py: the fault-injecting parts are built only when a FaultConfig asks for a
fault on their side, and inject exactly what it says (a delay before each message of one
transfer, a rank's death after its first message of one transfer, one lost acknowledgement)."""

from __future__ import annotations

import queue
import signal
from datetime import timedelta

import pytest
import torch
from kv_fakes import ROUTES, ManualTransport, make_cache, run_forward, until

from splitserve.kvtransfer import faults as faults_module
from splitserve.kvtransfer.faults import FaultyReceiver, FaultySender, make_receiver, make_sender
from splitserve.kvtransfer.messages import FaultConfig, RecvCommand
from splitserve.kvtransfer.receiver import KVReceiver
from splitserve.kvtransfer.sender import KVSender
from splitserve.kvtransfer.wire import RankKV


def _args(seed):
    events = queue.Queue()
    args = (0, "f/", RankKV(make_cache(seed), 0, 0), ManualTransport(), events.put, timedelta(seconds=300), None)
    return args, events


@pytest.mark.parametrize("faults, sender_cls, receiver_cls", [
    (FaultConfig(), KVSender, KVReceiver),
    (FaultConfig(drop_ack_of_transfer=0), KVSender, FaultyReceiver),
    (FaultConfig(delay_transfer=3, delay_s=0.1), FaultySender, KVReceiver),
    (FaultConfig(kill_prefill_rank=1, kill_on_transfer=2), FaultySender, KVReceiver),
    (FaultConfig(kill_prefill_rank=1), KVSender, KVReceiver),  # no transfer to die on: no fault
])
def test_the_faulty_parts_are_built_only_for_the_side_a_fault_is_asked_of(faults, sender_cls, receiver_cls):
    (sender_args, _), (receiver_args, _) = _args(0), _args(None)
    assert type(make_sender(faults, *sender_args)) is sender_cls
    assert type(make_receiver(faults, *receiver_args)) is receiver_cls


def test_the_sender_sleeps_before_each_message_of_the_delayed_transfer_only(monkeypatch):
    args, events = _args(0)
    sender = make_sender(FaultConfig(delay_transfer=2, delay_s=0.1), *args)
    sleeps = []  # (seconds, messages sent before the sleep)
    monkeypatch.setattr(faults_module.time, "sleep", lambda s: sleeps.append((s, len(sender.transport.sends))))
    run_forward(sender, 1, [0])  # two messages, not delayed
    assert not sleeps
    run_forward(sender, 2, [0])
    assert sleeps == [(0.1, 2), (0.1, 3)] and len(sender.transport.sends) == 4


def test_the_chosen_rank_kills_itself_right_after_its_first_message_of_the_chosen_transfer(monkeypatch):
    kills = []
    args, events = _args(0)
    sender = make_sender(FaultConfig(kill_prefill_rank=0, kill_on_transfer=2), *args)
    monkeypatch.setattr(faults_module.os, "kill", lambda pid, sig: kills.append((sig, len(sender.transport.sends))))
    run_forward(sender, 1, [0])
    assert not kills
    run_forward(sender, 2, [0])
    assert kills[0] == (signal.SIGKILL, 3)  # transfer 1's two messages, then 2's first

    other, _ = _args(0)  # rank 0 sends transfer 2 and lives when rank 1 is the one to die
    survivor = make_sender(FaultConfig(kill_prefill_rank=1, kill_on_transfer=2), *other)
    kills.clear()
    run_forward(survivor, 2, [0])
    assert not kills and len(survivor.transport.sends) == 2


def test_the_receiver_writes_the_chosen_transfer_but_never_acknowledges_it():
    args, events = _args(None)
    receiver = make_receiver(FaultConfig(drop_ack_of_transfer=1), *args)
    receiver.post_recv([RecvCommand(1, [0], ROUTES, 3), RecvCommand(2, [1], ROUTES, 3)])
    until(lambda: len(receiver.transport.recvs) == 4)
    for w in receiver.transport.recvs:
        w.deliver(torch.ones_like(w.tensor))
    event = events.get(timeout=10)
    assert (event.transfer_id, event.ok) == (2, True)
    until(lambda: receiver.kv.data[:, :, 0].all())  # 1 was written all the same
    with pytest.raises(queue.Empty):
        events.get(timeout=0.3)


def test_a_failure_of_the_dropped_transfer_is_still_reported():
    args, events = _args(None)
    receiver = make_receiver(FaultConfig(drop_ack_of_transfer=1), *args)
    receiver.post_recv([RecvCommand(1, [0], ROUTES, 3)])
    until(lambda: len(receiver.transport.recvs) == 2)
    for w in receiver.transport.recvs:
        w.deliver(error=RuntimeError("peer gone"))
    event = events.get(timeout=10)
    assert (event.transfer_id, event.ok) == (1, False)
