"""The transfer table on its own: every phase against every event, no engines, no ranks."""

from __future__ import annotations

import itertools

import pytest

from splitserve.workers.roles import FailurePolicy
from splitserve.workers.transfer_table import (
    STAGES, Aborted, Acked, Admit, ApplyPolicy, CancelReceive, Dropped, Expired, FirstToken, FreeBoth,
    IllegalTransition, Phase, Posted, RankFailed, TransferTable, TransferTimeouts,
)
from splitserve.kvtransfer.messages import Side

LEASE, ACK = 100.0, 10.0
PREFILL, DECODE = object(), object()


def _table(policy: FailurePolicy = FailurePolicy.RECOMPUTE) -> TransferTable:
    return TransferTable(TransferTimeouts(lease_s=LEASE, ack_s=ACK), policy)


def _open(table: TransferTable, request_id: str = "r", ranks: int = 2, now: float = 0.0):
    return table.open(table.new_id(), request_id=request_id, request=f"req:{request_id}", prefill=PREFILL,
                      decode=DECODE, reservation=f"seq:{request_id}", skip_blocks=1, num_decode_ranks=ranks,
                      queued_at=now - 1.0, now=now)


def _kinds(effects) -> list[type]:
    return [type(e) for e in effects]


def _in_phase(phase: Phase, table: TransferTable | None = None, ranks: int = 2):
    """A transfer brought to ``phase`` by legal events (2 decode ranks)."""
    table = _table() if table is None else table
    t = _open(table, ranks=ranks)
    if phase is Phase.RESERVED:
        return table, t
    table.handle(t, Posted(1.0))
    if phase is Phase.SENDING:
        return table, t
    if phase is Phase.TOKEN_BACK:
        table.handle(t, FirstToken(7, None, 2.0))
        return table, t
    if phase is Phase.ACKED:
        for r in range(ranks):
            table.handle(t, Acked(r, 100, 0.5, 2.0))
        return table, t
    if phase is Phase.ADMITTED:
        table.handle(t, FirstToken(7, None, 2.0))
        for r in range(ranks):
            table.handle(t, Acked(r, 100, 0.5, 3.0))
        return table, t
    if phase is Phase.FAILED:
        table.handle(t, Aborted())
        return table, t
    table.handle(t, Dropped())
    return table, t


def test_the_happy_path_token_first_then_acks():
    table = _table()
    t = _open(table, now=5.0)
    assert t.phase is Phase.RESERVED and t.lease_deadline == 5.0 + LEASE and len(table) == 1
    assert table.handle(t, Posted(6.0)) == []
    assert t.phase is Phase.SENDING and t.ack_deadline == 6.0 + ACK and t.lease_deadline == float("inf")
    assert table.handle(t, FirstToken(42, "lp", 7.0)) == []
    assert t.phase is Phase.TOKEN_BACK and t.first_token == 42 and t.logprobs == "lp"
    assert table.handle(t, Acked(0, 300, 0.25, 8.0)) == [] and t.phase is Phase.TOKEN_BACK
    effects = table.handle(t, Acked(1, 200, 0.5, 9.0))
    assert effects == [Admit(t)] and t.phase is Phase.ADMITTED
    assert len(table) == 0 and table.get(t.transfer_id) is None and table.of_request("r") is None
    m = table.metrics
    assert (m.num_transfers, m.num_bytes, m.seconds, m.num_failures) == (1, 500, 0.5, 0)
    [times] = table.stage_log
    assert list(times) == ["queued", "reserved", "sending", "first_token", "acked", "admitted"]
    assert [times[s] for s in STAGES] == [4.0, 5.0, 6.0, 7.0, 9.0, 9.0]


def test_acks_first_then_the_token_admits_from_acked():
    table, t = _in_phase(Phase.ACKED)
    assert t.phase is Phase.ACKED and t.ack_deadline == float("inf") and table.metrics.num_transfers == 1
    assert not t.past_deadline(1e9)  # no deadline: prefill's step is in flight
    assert table.handle(t, Expired(1e9)) == [] and t.phase is Phase.ACKED
    assert table.handle(t, FirstToken(9, None, 4.0)) == [Admit(t)] and t.first_token == 9
    assert t.phase is Phase.ADMITTED and len(table) == 0


def test_a_token_while_reserved_is_kept_and_the_transfer_stays_reserved():
    """The send was skipped (decode lost as the prefill step went out): the group's loss closes it."""
    table, t = _in_phase(Phase.RESERVED)
    assert table.handle(t, FirstToken(3, None, 1.0)) == [] and t.phase is Phase.RESERVED and t.first_token == 3
    assert table.handle(t, Dropped()) == [FreeBoth(t)] and t.phase is Phase.DROPPED


@pytest.mark.parametrize("phase", [Phase.RESERVED, Phase.SENDING, Phase.TOKEN_BACK, Phase.ACKED])
def test_a_rank_failure_fails_the_transfer_with_the_configured_policy(phase):
    table, t = _in_phase(phase, _table(FailurePolicy.FAIL))
    effects = table.handle(t, RankFailed(Side.DECODE, 1, "boom"))
    posted = [CancelReceive(t)] if phase.posted else []
    assert effects == [*posted, FreeBoth(t), ApplyPolicy(t, FailurePolicy.FAIL, "decode rank 1: boom")]
    assert t.phase is Phase.FAILED and t.error == "decode rank 1: boom"
    assert table.metrics.num_failures == 1 and len(table) == 0


def test_a_prefill_rank_failure_names_the_send():
    table, t = _in_phase(Phase.SENDING)
    *_, policy = table.handle(t, RankFailed(Side.PREFILL, 0, "gone"))
    assert policy == ApplyPolicy(t, FailurePolicy.RECOMPUTE, "prefill rank 0 could not send: gone")


@pytest.mark.parametrize("phase", [Phase.RESERVED, Phase.SENDING, Phase.TOKEN_BACK, Phase.ACKED])
def test_an_abort_fails_with_the_fail_policy_and_is_not_counted(phase):
    table, t = _in_phase(phase)
    effects = table.handle(t, Aborted())
    assert _kinds(effects) == [*([CancelReceive] if phase.posted else []), FreeBoth, ApplyPolicy]
    assert effects[-1] == ApplyPolicy(t, FailurePolicy.FAIL, "aborted by the client")
    assert table.metrics.num_failures == 0 and t.phase is Phase.FAILED


@pytest.mark.parametrize("phase", [Phase.RESERVED, Phase.SENDING, Phase.TOKEN_BACK, Phase.ACKED])
def test_dropped_frees_both_sides_cancels_a_posted_receive_and_applies_no_policy(phase):
    table, t = _in_phase(phase)
    effects = table.handle(t, Dropped())
    assert effects == ([CancelReceive(t)] if phase.posted else []) + [FreeBoth(t)]
    assert t.phase is Phase.DROPPED and len(table) == 0 and table.metrics.num_failures == 0


def test_the_lease_expires_only_while_reserved():
    table, t = _in_phase(Phase.RESERVED)
    assert not t.past_deadline(LEASE) and table.handle(t, Expired(LEASE)) == []
    assert t.past_deadline(LEASE + 0.1)
    effects = table.handle(t, Expired(LEASE + 0.1))
    assert _kinds(effects) == [FreeBoth, ApplyPolicy] and "lease" in effects[-1].reason
    assert table.metrics.num_timeouts == 0 and table.metrics.num_failures == 1


@pytest.mark.parametrize("phase", [Phase.SENDING, Phase.TOKEN_BACK])
def test_the_ack_deadline_times_out_a_posted_transfer(phase):
    table, t = _in_phase(phase)
    assert table.handle(t, Expired(1.0 + ACK)) == [] and t.phase is phase  # not yet: posted at 1.0
    effects = table.handle(t, Expired(1.0 + ACK + 0.1))
    assert _kinds(effects) == [CancelReceive, FreeBoth, ApplyPolicy]
    assert effects[-1].reason == f"no acknowledgement within {ACK:.1f} s"
    assert table.metrics.num_timeouts == 1 and table.metrics.num_failures == 1


ILLEGAL = {
    Phase.RESERVED: [Acked(0, 1, 0.1, 0)],  # an ack before any receive is posted
    Phase.SENDING: [Posted(2.0)],
    Phase.TOKEN_BACK: [Posted(2.0), FirstToken(8, None, 3.0)],
    Phase.ACKED: [Posted(2.0), Acked(0, 1, 0.1, 3.0)],
}


@pytest.mark.parametrize("phase,event", [(p, e) for p, es in ILLEGAL.items() for e in es])
def test_events_a_live_phase_cannot_take_are_refused_and_change_nothing(phase, event):
    table, t = _in_phase(phase)
    before = (t.phase, t.first_token, set(t.acks), t.num_bytes, t.ack_deadline, table.metrics.num_transfers)
    with pytest.raises(IllegalTransition):
        table.handle(t, event)
    assert (t.phase, t.first_token, set(t.acks), t.num_bytes, t.ack_deadline, table.metrics.num_transfers) == before
    assert table.get(t.transfer_id) is t


def test_a_rank_acknowledging_twice_is_refused():
    table, t = _in_phase(Phase.SENDING)
    table.handle(t, Acked(0, 10, 0.1, 2.0))
    with pytest.raises(IllegalTransition, match="twice"):
        table.handle(t, Acked(0, 10, 0.1, 2.0))
    assert t.acks == {0} and t.num_bytes == 10 and t.phase is Phase.SENDING


EVERY_EVENT = [Posted(9.0), Acked(0, 1, 0.1, 9.0), FirstToken(1, None, 9.0), RankFailed(Side.DECODE, 0, "x"),
               Expired(1e9), Aborted(), Dropped()]


@pytest.mark.parametrize("phase,event", list(itertools.product([Phase.ADMITTED, Phase.FAILED, Phase.DROPPED],
                                                                EVERY_EVENT)))
def test_nothing_is_taken_after_the_end(phase, event):
    table, t = _in_phase(phase)
    assert not t.phase.live and len(table) == 0
    with pytest.raises(IllegalTransition, match="after its end"):
        table.handle(t, event)
    assert t.phase is phase


def test_open_refuses_unissued_ids_and_a_second_transfer_of_one_request():
    table = _table()
    with pytest.raises(IllegalTransition):
        table.open(5, request_id="a", request=None, prefill=PREFILL, decode=DECODE, reservation=None,
                   skip_blocks=0, num_decode_ranks=1, queued_at=0, now=0)
    t = _open(table, "a")
    with pytest.raises(IllegalTransition, match="open transfer already"):
        _open(table, "a")
    with pytest.raises(IllegalTransition, match="open already"):
        table.open(t.transfer_id, request_id="b", request=None, prefill=PREFILL, decode=DECODE, reservation=None,
                   skip_blocks=0, num_decode_ranks=1, queued_at=0, now=0)
    assert len(table) == 1 and table.of_request("a") is t


def test_lookups_count_open_transfers_per_group():
    table = _table()
    other = object()
    a, b = _open(table, "a"), _open(table, "b")
    c = table.open(table.new_id(), request_id="c", request=None, prefill=other, decode=other, reservation=None,
                   skip_blocks=0, num_decode_ranks=1, queued_at=0, now=0)
    assert table.incoming() == {DECODE: 2, other: 1}
    assert table.involving(PREFILL) == [a, b] and table.involving(other) == [c]
    assert list(table) == [a, b, c] and a.transfer_id < b.transfer_id < c.transfer_id
    table.handle(b, Dropped())
    assert table.incoming() == {DECODE: 1, other: 1} and table.of_request("b") is None


def test_stage_summary_reports_each_stage_and_clears():
    table = _table()
    for i in range(3):
        t = _open(table, f"r{i}", ranks=1, now=float(i))
        table.handle(t, Posted(i + 0.5))
        table.handle(t, FirstToken(1, None, i + 1.0))
        table.handle(t, Acked(0, 1, 0.1, i + 1.5))
    summary = table.stage_summary(clear=True)
    assert summary["reserved->sending"]["mean"] == pytest.approx(500.0)
    assert summary["queued->admitted"]["n"] == 3 and summary["queued->admitted"]["p50"] == pytest.approx(2500.0)
    assert table.stage_summary() == {}
