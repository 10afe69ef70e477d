"""The disaggregated engine's request book on its own: the line, retries, stitching, failing."""

from __future__ import annotations

from splitserve.workers.disagg_requests import DisaggRequest, RequestBook
from splitserve.workers.outputs import RequestOutput
from splitserve.workers.sampling_params import SamplingParams


def _req(rid: str, max_tokens: int = 8) -> DisaggRequest:
    return DisaggRequest(rid, [1, 2, 3], SamplingParams(max_tokens=max_tokens, min_tokens=2), False, None, 0.0)


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids)


def _out(rid: str, ids: list[int], text: str, finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id=rid, prompt_token_ids=[1, 2, 3], token_ids=ids, text=text, finished=finished)


def test_first_come_first_served_and_push_front_keeps_the_head():
    book = RequestBook(max_retries=1)
    a, b = _req("a"), _req("b")
    book.add(a)
    book.add(b)
    assert "a" in book and book.num_live == 2 and book.is_queued(a)
    assert book.next_queued() is a
    book.push_front(a)  # it must wait: still first
    assert book.next_queued() is a and book.next_queued() is b and book.next_queued() is None
    assert book.num_live == 2 and book.has_unfinished()


def test_retry_goes_first_in_line_until_max_retries():
    book = RequestBook(max_retries=2)
    a, b = _req("a"), _req("b")
    book.add(b)
    book.add(a)
    assert book.next_queued() is b
    assert book.retry(b, "lost") and book.next_queued() is b and b.retries == 1 and book.num_resent == 1
    assert book.retry(b, "lost") and b.retries == 2
    assert not book.retry(b, "lost") and book.num_resent == 2  # the third is refused: the caller fails it
    assert book.next_queued() is b and book.next_queued() is a


def test_carry_over_makes_the_continuation_and_stitches_the_next_output():
    book = RequestBook(max_retries=3)
    r = _req("r")
    book.add(r)
    book.emit(_out("r", [4], "e"))  # the client has seen one token
    r.decode = "group-0"
    book.carry_over(r, [4, 5], _Tok())  # the lost group had generated one more it never reported
    assert r.decode is None and r.done_ids == [4, 5] and r.done_text == "ef"
    prompt, params = r.continuation()
    assert prompt == [1, 2, 3, 4, 5] and params.max_tokens == 6 and params.min_tokens == 0
    book.take_outputs()
    book.emit(_out("r", [6], "g", finished=True))  # from the new group's view: its first token
    [out] = book.take_outputs()
    assert out.token_ids == [4, 5, 6] and out.text == "efg" and out.prompt_token_ids == [1, 2, 3]
    assert out.new_token_ids == [5, 6] and out.new_text == "fg"  # the unreported token comes now
    assert "r" not in book and not book.has_unfinished()


def test_fail_ends_the_request_with_what_it_had_and_emit_ignores_the_unknown():
    book = RequestBook(max_retries=3)
    r = _req("r")
    book.add(r)
    r.done_ids, r.done_text = [7], "h"
    book.fail(r, "no decode group is available", code="INTERNAL")
    book.emit(_out("r", [9], "j"))  # a late output of a failed request is dropped
    book.emit(_out("nobody", [9], "j"))
    [out] = book.take_outputs()
    assert (out.finished, out.finish_reason, out.error, out.error_code) == (True, "abort", "no decode group is available",
                                                                            "INTERNAL")
    assert out.token_ids == [7] and out.text == "h" and book.num_live == 0 and book.take_outputs() == []
