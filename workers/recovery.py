"""What the disaggregated engine does when a group, or a batch on it, is lost.

`Recovery` decides, for each request a loss touches, whether it is re-sent or failed; it
changes groups only through the two calls the engine gives it (``close``: a transfer event
carried out on both groups; ``look``: read a group's ranks now, which may find it lost too).

    group lost      `group_lost`: the group is marked and its engine fails everything it held
                    (judging the batch whose exception ended it, if one did); groups at the
                    other end of its transfers are looked at first (both may be gone); its
                    transfers are dropped on both sides; a generating group's running
                    requests carry over the tokens it generated and move on
    batch raised    `prefill_batch_judged`: a prefill step raised and its ranks went on: the
                    batch's transfers are dropped; `mark_suspects`: a decode step raised: its
                    engine re-runs the suspects isolated; they stay suspects if they move
    each request    `after_loss`: the culprit of a step that raised fails, never re-sent;
                    anything else is re-sent (a suspect to run isolated), up to
                    ``max_retries`` times
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from splitserve.workers.disagg_requests import DisaggRequest, RequestBook
from splitserve.workers.engine import Verdict
from splitserve.workers.executor import WorkerGroupError
from splitserve.workers.group_set import Group
from splitserve.workers.transfer_table import Dropped, Event, Transfer, TransferTable

logger = logging.getLogger(__name__)


class Recovery:
    def __init__(self, book: RequestBook, transfers: TransferTable, *,
                 close: Callable[[Transfer, Event], None], look: Callable[[Group], None], tokenizer):
        self._book = book
        self._transfers = transfers
        self._close = close
        self._look = look
        self._tokenizer = tokenizer

    def group_lost(self, group: Group, err: WorkerGroupError) -> None:
        """A group is gone: its requests end there; transfers through it are dropped on both
        sides and their requests re-sent; a generating group's running requests continue
        elsewhere. If a step's exception ended it, that batch's requests are judged first."""
        group.error, group.failed_at = group.error or str(err), time.monotonic()
        if group.engine.failure is None:  # the step that ended it, however its loss was found
            group.engine.fail_all(str(err), err.step_failure or group.engine.step_failure)
        blamed = group.engine.blamed
        logger.error("group %s failed: %s", group.name, group.error)
        # The groups at the other end of its transfers may be gone too (both lost at once):
        # looked at first, so that no request is aborted on a dead group that has not been
        # marked yet (its `fail_all` would then miss blocks of a batch in flight).
        through = self._transfers.involving(group)
        for other in {t.decode if t.prefill is group else t.prefill for t in through}:
            self._look(other)
        why_lost = f"{group.name} failed: {group.error}"
        for transfer in self._transfers.involving(group):
            self._close(transfer, Dropped())
            verdict, why = blamed.get(transfer.request_id, (None, ""))
            self.after_loss(transfer.request, verdict, why or why_lost)
        if group.role.generates:
            lost = group.engine.lost_outputs
            for request in self._book.on_group(group):
                self._book.carry_over(request, lost.get(request.request_id, []), self._tokenizer)
                verdict, why = blamed.get(request.request_id, (None, ""))
                self.after_loss(request, verdict, why or why_lost)

    def prefill_batch_judged(self, group: Group) -> None:
        """A prefill step raised and the group went on: its engine aborted the batch's requests
        (`LLMEngine.blamed`); their transfers end, the culprit fails, the others are re-sent."""
        if not group.healthy:
            return  # a group lost on the way: `group_lost` judged them
        for request_id, (verdict, reason) in group.engine.blamed.items():
            transfer = self._transfers.of_request(request_id)
            if transfer is None or transfer.prefill is not group:
                continue
            self._close(transfer, Dropped())
            self.after_loss(transfer.request, verdict, reason if verdict is Verdict.CULPRIT else f"{group.name}: {reason}")

    def mark_suspects(self, group: Group) -> None:
        """A decode step raised and the group went on: its engine runs the suspects again
        isolated; they stay suspects if they have to move to another group."""
        if group.healthy:
            for request_id, (verdict, _) in group.engine.blamed.items():
                request = self._book.get(request_id)
                if verdict is Verdict.SUSPECT and request is not None:
                    request.suspect = True

    def after_loss(self, request: DisaggRequest, verdict: Verdict | None, reason: str) -> None:
        """A request lost with its group or its batch: the culprit of a step that raised fails
        (never re-sent); any other is re-sent, a suspect to run isolated."""
        if verdict is Verdict.CULPRIT:
            logger.error("request %s is failed, not re-sent: %s", request.request_id, reason)
            self._book.fail(request, reason, code="INTERNAL")
            return
        request.suspect = request.suspect or verdict is Verdict.SUSPECT
        if not self._book.retry(request, reason):
            self._book.fail(request, f"gave up after {request.retries - 1} retries: {reason}")
