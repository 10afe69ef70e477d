"""check_stop: EOS, stop tokens, stop strings across token boundaries, truncation, length."""

import pytest

from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.stop_checker import StopDecision, check_stop, stream_holdback

EOS = 2


def run(params, pieces, token_ids=None, eos=(EOS,)):
    """Feed (token, text delta) steps as the engine would; return (decision, step, text)."""
    token_ids = token_ids or [10 + i for i in range(len(pieces))]
    text, output = "", []
    for step, (token, delta) in enumerate(zip(token_ids, pieces)):
        text += delta
        output.append(token)
        decision = check_stop(params, output, token, eos, text, len(delta))
        if decision is not None:
            return decision, step, text[:decision.truncate_to]
    return None, None, text


def test_eos_stops_without_reason():
    decision, step, text = run(SamplingParams(), ["a", "b", ""], [5, 6, EOS])
    assert decision == StopDecision("stop", None, None)
    assert (step, text) == (2, "ab")


def test_ignore_eos_generates_on():
    decision, _, _ = run(SamplingParams(ignore_eos=True), ["a", ""], [5, EOS])
    assert decision is None


def test_no_eos_token_never_matches():
    assert check_stop(SamplingParams(), [5], 5, (), "a", 1) is None


def test_any_of_several_eos_ids_stops():
    decision, step, _ = run(SamplingParams(), ["a", "b", ""], [5, 7, 9], eos=(7, 9))
    assert decision == StopDecision("stop", None, 1) and step == 1


def test_stop_token_id_reports_itself_and_drops_its_text():
    params = SamplingParams(stop_token_ids=[42])
    decision, step, text = run(params, ["Hi", " there", "<end>"], [5, 6, 42])
    assert (decision.finish_reason, decision.stop_reason, step) == ("stop", 42, 2)
    assert text == "Hi there"


def test_stop_token_text_kept_with_include_stop_str_in_output():
    params = SamplingParams(stop_token_ids=[42], include_stop_str_in_output=True)
    _, _, text = run(params, ["Hi", "<end>"], [5, 42])
    assert text == "Hi<end>"


def test_max_tokens_gives_length():
    decision, step, text = run(SamplingParams(max_tokens=3), ["a", "b", "c", "d"])
    assert decision == StopDecision("length")
    assert (step, text) == (2, "abc")


def test_eos_on_the_last_allowed_token_is_stop_not_length():
    decision, _, _ = run(SamplingParams(max_tokens=2), ["a", ""], [5, EOS])
    assert decision.finish_reason == "stop"


def test_stop_string_across_token_boundaries_is_cut_out():
    params = SamplingParams(stop=["o w"])
    decision, step, text = run(params, ["Hel", "lo ", "wor", "ld"])
    assert (decision.finish_reason, decision.stop_reason, step) == ("stop", "o w", 2)
    assert text == "Hell"


def test_text_after_the_stop_string_in_the_same_delta_is_dropped():
    decision, _, text = run(SamplingParams(stop="\n\n"), ["Answer", ": 4\n\nQuestion"])
    assert decision.stop_reason == "\n\n"
    assert text == "Answer: 4"


def test_include_stop_str_in_output_keeps_the_stop_string():
    params = SamplingParams(stop=["o w"], include_stop_str_in_output=True)
    _, _, text = run(params, ["Hel", "lo ", "wor", "ld"])
    assert text == "Hello w"


def test_stop_string_beats_length_on_the_same_token():
    decision, _, text = run(SamplingParams(max_tokens=2, stop="END"), ["x", "yEND"])
    assert (decision.finish_reason, text) == ("stop", "xy")


def test_earliest_stop_string_wins():
    params = SamplingParams(stop=["cd", "bc"])
    decision, _, text = run(params, ["a", "bcd"])
    assert (decision.stop_reason, text) == ("bc", "a")


def test_only_the_tail_is_searched():
    # A stop string wholly inside old text was already seen (or allowed by min_tokens): the new
    # delta must take part in the match.
    params = SamplingParams(stop=["ab"])
    assert check_stop(params, [1, 7], 7, (EOS,), "abxyz", 2) is None
    assert check_stop(params, [1, 7], 7, (EOS,), "xyza", 1) is None
    assert check_stop(params, [1, 7], 7, (EOS,), "xyzab", 1).truncate_to == 3


def test_no_new_text_cannot_complete_a_stop_string():
    # A held-back token (half a character) adds no text, so nothing new can match.
    assert check_stop(SamplingParams(stop=["b"]), [1], 1, (EOS,), "ab", 0) is None


def test_min_tokens_suppresses_stops_until_reached():
    params = SamplingParams(min_tokens=2, stop=["!"], stop_token_ids=[9], max_tokens=10)
    assert check_stop(params, [EOS], EOS, (EOS,), "", 0) is None
    assert check_stop(params, [5, 9], 9, (EOS,), "a?", 1) is None
    assert check_stop(params, [5, 6], 6, (EOS,), "a!", 1) is None
    assert check_stop(params, [5, 6, EOS], EOS, (EOS,), "a!", 0).finish_reason == "stop"
    assert check_stop(params, [5, 6, 9], 9, (EOS,), "a!?", 1).stop_reason == 9
    assert check_stop(params, [5, 6, 7], 7, (EOS,), "a!?!", 1).stop_reason == "!"


def test_min_tokens_does_not_suppress_length():
    params = SamplingParams(min_tokens=3, max_tokens=3)
    assert check_stop(params, [5, 6, 7], 7, (EOS,), "abc", 1) == StopDecision("length")


@pytest.mark.parametrize(
    "kw, holdback",
    [({}, 0), ({"stop": ["abc", "x"]}, 2), ({"stop": "x"}, 0),
     ({"stop": ["abcd"], "include_stop_str_in_output": True}, 0)],
)
def test_stream_holdback(kw, holdback):
    assert stream_holdback(SamplingParams(**kw)) == holdback
